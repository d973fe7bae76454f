"""Train-time interventions on the organism (CAFT ablation, preventative steering), per seed, from the matrix.

The insecure fine-tune is rerun with the persona direction of *another* seed's insecure run ablated
(CAFT) or added (preventative steering) on every training forward pass, and with random directions of
equal per-layer norm used the same way. ``EXPECTED``: the verdicts the 3-seed report shows.
"""

import math

import pytest

from emis_interp import organism_matrix as om

EXPECTED = {"caft_task": False, "caft_em": False, "steer_task": False, "steer_em": False}


@pytest.mark.parametrize("key", list(EXPECTED))
def test_claim_verdict(matrix, key):
    v = om.verdicts(matrix)
    rows = matrix["interventions"][key.split("_")[0]]["per_seed"]
    assert v[key] is EXPECTED[key], (key, [{**r["persona"], "random": r["random"]} for r in rows])


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
