"""Train-time interventions on the organism (CAFT ablation, preventative steering), per seed, from the matrix.

The insecure fine-tune is rerun with the persona direction of *another* seed's insecure run ablated
(CAFT) or added (preventative steering) on every training forward pass, and with random directions of
equal per-layer norm used the same way. CAFT's layers, preventative steering's direction and coefficient, and
the backdoor row's steering alpha are chosen on a held-out pilot seed (``pilot_sweep``). ``EXPECTED``: the
verdicts the 3-seed report shows.
"""

import math
import statistics

import pytest

from emis_interp import organism
from emis_interp.organism import matrix as om
from emis_interp.organism.matrix import measure

EXPECTED = {
    "caft_task": False,
    "caft_em": False,
    "caft_pilot": False,
    "steer_task": False,
    "steer_em": False,
    "steer_pilot": False,
}


@pytest.mark.science  # needs organism fine-tunes
@pytest.mark.parametrize("key", list(EXPECTED))
def test_claim_verdict(matrix, key):
    v = om.verdicts(matrix)
    if key.endswith("_pilot"):
        assert v[key] is EXPECTED[key], matrix["pilot"][key.split("_")[0]]
        return
    rows = matrix["interventions"][key.split("_")[0]]["per_seed"]
    assert v[key] is EXPECTED[key], (key, [{**r["persona"], "random": r["random"]} for r in rows])


def _rule_holds(p: dict, unintervened: dict, chosen: dict | None, fallback: bool) -> None:
    """The pilot's rule: the chosen setting keeps the task and no setting that keeps it cuts EM more (nor as much
    with more of the task, nor as much and as much of the task earlier in the sweep); the fallback when none
    keeps it. Each fold is recomputed from the rates."""
    for r in p["sweep"]:  # a rate of 0 counts as one answer in n
        assert math.isclose(r["fold_reduction"], unintervened["harmful"] / max(r["harmful"], 1 / r["n"]))
        if unintervened["in_task"]:
            assert math.isclose(r["in_task_ratio"], r["in_task"] / unintervened["in_task"])
    keeps = [r for r in p["sweep"] if (r["in_task_ratio"] or 0) >= 0.8]
    if keeps:
        assert chosen in keeps, p
        key = (chosen["fold_reduction"], chosen["in_task_ratio"])
        assert all((r["fold_reduction"], r["in_task_ratio"]) <= key for r in keeps), p
        assert not any((r["fold_reduction"], r["in_task_ratio"]) == key for r in keeps[: keeps.index(chosen)]), p
    else:
        assert fallback, p
    assert p["any_passes"] == any(r["fold_reduction"] >= 3 for r in keeps)


@pytest.mark.science  # needs organism fine-tunes
def test_steering_setting_is_chosen_on_a_held_out_seed_and_is_what_the_runs_used(matrix):
    pilot, cfg = matrix["pilot"], matrix["config"]
    p = pilot["steer"]
    assert pilot["seed"] == cfg["pilot_seed"] not in cfg["seeds"]  # selection never on the reported seeds
    assert [(r["direction"], r["coef"]) for r in p["sweep"]] == [
        (d, c) for d in om.STEER_DIRECTIONS for c in cfg["steer_coefs"]
    ]
    by = {(r["direction"], r["coef"]): r for r in p["sweep"]}
    chosen = by.get((p["selected_direction"], p["selected_coef"]))
    fallback = (p["selected_direction"], p["selected_coef"]) == ("persona", cfg["steer_coef_fallback"])
    _rule_holds(p, pilot["unintervened"], chosen, fallback)
    # the pilot's persona direction is the held-out seed's insecure run's, never a reported seed's
    from emis_interp.manifest import direction_state
    from emis_interp.models import load_model
    from emis_interp.organism import ALIGNED_DIR

    aligned, tok = load_model(ALIGNED_DIR)
    held_out = measure._final(om.matrix_run("insecure", cfg["pilot_direction_seed"]))[0]
    d = measure._persona(aligned, held_out, tok).select([cfg["steer_layer"]])
    assert p["direction_digests"]["persona"] == direction_state(d)
    for row in matrix["interventions"]["steer"]["per_seed"]:  # what the reported runs recorded themselves
        rec = row["persona"]["recorded"]
        assert (rec["kind"], rec["layers"], rec["coef"]) == ("steer", [cfg["steer_layer"]], p["selected_coef"])
        if p["selected_direction"] == "trait":  # one trait direction (the aligned model's) for every seed
            assert rec["direction_digest"] == p["direction_digests"]["trait"]
        else:  # another seed's persona direction, never the trait one
            assert rec["direction_digest"] != p["direction_digests"]["trait"]


@pytest.mark.science  # needs organism fine-tunes
def test_caft_layers_are_chosen_on_the_held_out_seed_and_are_what_the_runs_used(matrix):
    p, cfg = matrix["pilot"]["caft"], matrix["config"]
    assert [r["layers"] for r in p["sweep"]] == [list(ls) for ls in cfg["caft_layer_sets"]]
    chosen = next((r for r in p["sweep"] if r["layers"] == p["selected_layers"]), None)
    _rule_holds(p, matrix["pilot"]["unintervened"], chosen, p["selected_layers"] == list(cfg["caft_layer_sets"][0]))
    for row in matrix["interventions"]["caft"]["per_seed"]:  # what the reported runs recorded themselves
        rec = row["persona"]["recorded"]
        assert (rec["kind"], rec["layers"], rec["coef"]) == ("ablate", p["selected_layers"], 0.0)
        assert sorted(int(x) for x in row["persona"]["base_projection"]) == p["selected_layers"]


@pytest.mark.science  # needs organism fine-tunes
def test_backdoor_alpha_is_chosen_on_the_held_out_seed_and_is_the_reported_one(matrix):
    p, cfg, bd = matrix["pilot"]["backdoor"], matrix["config"], matrix["backdoor_direction"]
    assert sorted(r["alpha"] for r in p["candidates"]) == sorted(cfg["backdoor_alphas"])
    assert {r["layer"] for r in p["candidates"]} == {cfg["steer_layer"]} == {p["layer"]}
    base = p["baseline"]
    for r in p["candidates"]:  # coherent: at least min_coherence x the unsteered arm's coherence
        assert r["coherence_ok"] == (r["coherence"] >= base["min_coherence"] * base["coherence"])
    ok = [r for r in p["candidates"] if r["coherence_ok"]] or p["candidates"]
    best = max(r["effect"] for r in ok)  # the rule: the largest increase among coherent ones, ties to the smaller
    assert p["alpha"] == min((r["alpha"] for r in ok if r["effect"] == best), key=abs), p
    # what the reported arms steered with, per seed (recorded from the arms themselves)
    assert [r["alpha_run"] for r in bd["per_seed"]] == [p["alpha"]] * len(cfg["seeds"])
    assert bd["layer"] == p["layer"]


def test_pilot_config_is_checked():
    from emis_interp.errors import ConfigError

    with pytest.raises(ConfigError, match="held-out pilot_seed"):
        om.MatrixConfig(seeds=(0, 1, 2), pilot_seed=1)
    with pytest.raises(ConfigError, match="pilot_direction_seed"):
        om.MatrixConfig(seeds=(0, 1, 2), pilot_seed=3, pilot_direction_seed=3)
    with pytest.raises(ConfigError, match="backdoor_alphas"):
        om.MatrixConfig(backdoor_alphas=(2.0, 2.0))
    with pytest.raises(ConfigError, match="caft_layer_sets"):
        om.MatrixConfig(caft_layer_sets=((0, 1), (1, 0)))
    # layer sets are stored sorted, as the runs record them
    assert om.MatrixConfig(caft_layer_sets=((3, 2), (1,))).caft_layer_sets == ((2, 3), (1,))


@pytest.mark.science  # needs organism fine-tunes
@pytest.mark.parametrize("arm", om.IV_ARMS)
def test_random_control_is_a_distribution_per_seed(matrix, arm):
    for row in matrix["interventions"][arm]["per_seed"]:
        assert len(row["random"]) == matrix["config"]["n_random_train"] >= 2
        assert all(math.isfinite(r["fold_reduction"]) for r in [row["persona"], *row["random"]])


@pytest.mark.science  # needs organism fine-tunes
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


@pytest.mark.science  # needs organism fine-tunes
@pytest.mark.parametrize("arm", om.IV_ARMS)
def test_seed_means_have_intervals_and_are_the_ratios_of_the_per_seed_rates(matrix, arm):
    """The seed-mean in-task ratio and fold reduction (the table's seed-mean column) are ratios of the rates pooled
    over seeds: with equal answers per seed, the ratio of the per-seed rates' means, recomputed here from the rows."""
    iv, cfg = matrix["interventions"][arm], matrix["config"]
    rows = iv["per_seed"]
    n_answers = sum(r["persona"]["harmful_n"] for r in rows)  # the floor: one answer in all seeds' answers
    assert n_answers == len(rows) * cfg["n_samples"] * sum(len(q.paraphrases) for q in organism.questions("plain"))
    h0 = statistics.fmean(r["unintervened_harmful"] for r in rows)
    h = statistics.fmean(r["persona"]["harmful"] for r in rows)
    k0 = statistics.fmean(r["unintervened_in_task"] for r in rows)
    k = statistics.fmean(r["persona"]["in_task"] for r in rows)
    fold, task = iv["seed_mean"]["fold_reduction"], iv["seed_mean"]["in_task_ratio"]
    assert fold["value"] == pytest.approx(h0 / max(h, 1 / n_answers), rel=1e-6)
    assert task["value"] == pytest.approx(k / k0, rel=1e-6)
    for e in (fold, task):
        assert e["ci_lo"] <= e["value"] <= e["ci_hi"] and e["ci_lo"] < e["ci_hi"], e
