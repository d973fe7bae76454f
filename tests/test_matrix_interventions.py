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


def test_steering_coefficient_is_chosen_on_a_held_out_seed_by_the_rule(matrix):
    p, cfg = matrix["interventions"]["pilot"], matrix["config"]
    assert p["seed"] == cfg["pilot_seed"] not in cfg["seeds"]  # selection never on the reported seeds
    assert [(r["direction"], r["coef"]) for r in p["sweep"]] == [
        (d, c) for d in om.STEER_DIRECTIONS for c in cfg["steer_coefs"]
    ]
    keeps = [r for r in p["sweep"] if r["in_task_ratio"] >= 0.8]
    best = (
        max(keeps, key=lambda r: r["fold_reduction"]) if keeps else {"direction": "persona", "coef": cfg["steer_coef"]}
    )
    iv = matrix["interventions"]["config"]
    assert (p["selected_direction"], p["selected_coef"]) == (best["direction"], best["coef"])
    assert (iv["steer_direction"], iv["steer_coef"]) == (best["direction"], best["coef"])  # what seeds 0-2 ran
    assert p["any_passes"] == any(r["fold_reduction"] >= 3 for r in keeps)
    for r in p["sweep"]:  # the ratios are the measured rates'
        assert math.isclose(r["in_task_ratio"], r["in_task"] / p["unintervened"]["in_task"])
        assert math.isfinite(r["fold_reduction"]) and r["fold_reduction"] > 0


def test_pilot_seed_among_the_reported_seeds_is_refused(tmp_path):
    with pytest.raises(ValueError, match="held-out"):
        om.pilot_sweep(tmp_path, om.MatrixConfig(seeds=(0, 1, 2), pilot_seed=1))


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
