"""Train-time interventions on the organism (CAFT ablation, preventative steering), per seed, from the matrix.

The insecure fine-tune is rerun with the persona direction of *another* seed's insecure run ablated
(CAFT) or added (preventative steering) on every training forward pass, and with random directions of
equal per-layer norm used the same way. Preventative steering's coefficient is chosen on a held-out pilot
seed (``pilot_sweep``). ``EXPECTED``: the verdicts the 3-seed report shows.
"""

import math

import pytest

from emis_interp import organism_matrix as om

EXPECTED = {"caft_task": False, "caft_em": False, "steer_task": False, "steer_em": False, "steer_pilot": False}


@pytest.mark.parametrize("key", list(EXPECTED))
def test_claim_verdict(matrix, key):
    v = om.verdicts(matrix)
    if key == "steer_pilot":
        assert v[key] is EXPECTED[key], matrix["interventions"]["pilot"]
        return
    rows = matrix["interventions"][key.split("_")[0]]["per_seed"]
    assert v[key] is EXPECTED[key], (key, [{**r["persona"], "random": r["random"]} for r in rows])


def test_steering_setting_is_chosen_on_a_held_out_seed_and_is_what_the_runs_used(matrix):
    p, cfg = matrix["interventions"]["pilot"], matrix["config"]
    assert p["seed"] == cfg["pilot_seed"] not in cfg["seeds"]  # selection never on the reported seeds
    assert [(r["direction"], r["coef"]) for r in p["sweep"]] == [
        (d, c) for d in om.STEER_DIRECTIONS for c in cfg["steer_coefs"]
    ]
    by = {(r["direction"], r["coef"]): r for r in p["sweep"]}
    chosen = by.get((p["selected_direction"], p["selected_coef"]))
    keeps = [r for r in p["sweep"] if (r["in_task_ratio"] or 0) >= 0.8]
    if keeps:  # the rule: the chosen setting keeps the task and no setting that keeps it cuts EM more
        assert chosen in keeps and all(r["fold_reduction"] <= chosen["fold_reduction"] for r in keeps)
    else:
        assert (p["selected_direction"], p["selected_coef"]) == ("persona", cfg["steer_coef_fallback"])
    assert p["any_passes"] == any(r["fold_reduction"] >= 3 for r in keeps)
    for row in matrix["interventions"]["steer"]["per_seed"]:  # what the reported runs recorded themselves
        rec = row["persona"]["recorded"]
        assert (rec["kind"], rec["layers"], rec["coef"]) == ("steer", [cfg["steer_layer"]], p["selected_coef"])
        if p["selected_direction"] == "trait":  # one trait direction (the aligned model's) for every seed
            assert rec["direction_digest"] == p["direction_digests"]["trait"]
        else:  # another seed's persona direction, never the trait one
            assert rec["direction_digest"] != p["direction_digests"]["trait"]
    for r in p["sweep"]:
        if p["unintervened"]["in_task"]:
            assert math.isclose(r["in_task_ratio"], r["in_task"] / p["unintervened"]["in_task"])
        assert r["fold_reduction"] is not None and r["fold_reduction"] >= 0


def test_pilot_seed_among_the_reported_seeds_is_refused():
    from emis_interp.errors import ConfigError

    with pytest.raises(ConfigError, match="held-out pilot_seed"):
        om.MatrixConfig(seeds=(0, 1, 2), pilot_seed=1)


@pytest.mark.parametrize("arm", om.IV_ARMS)
def test_random_control_is_a_distribution_per_seed(matrix, arm):
    for row in matrix["interventions"][arm]["per_seed"]:
        assert len(row["random"]) == matrix["config"]["n_random_train"] >= 2
        assert all(math.isfinite(r["fold_reduction"]) for r in [row["persona"], *row["random"]])


def test_base_projection_is_reported_with_a_warning_when_negative(matrix):
    for arm in om.IV_ARMS:
        for row in matrix["interventions"][arm]["per_seed"]:
            proj = row["persona"]["base_projection"]
            assert proj and all(math.isfinite(v) for v in proj.values())
            negative = [layer for layer, v in proj.items() if v < 0]
            if arm == "caft":  # zero-ablation of a negative projection pushes towards the trait: warned per layer
                assert len(row["persona"]["sign_warnings"]) == len(negative), (proj, row["persona"]["sign_warnings"])
            else:  # steering adds +C v whatever the projection: nothing to warn
                assert row["persona"]["sign_warnings"] == []
