"""Train-time interventions on the organism (CAFT ablation, preventative steering), per seed, from the matrix.

The insecure fine-tune is rerun with the persona direction of *another* seed's insecure run ablated
(CAFT) or added (preventative steering) on every training forward pass, and with random directions of
equal norm used the same way.
"""

import math

import pytest

from emis_interp import organism_matrix as om


@pytest.mark.parametrize("arm", om.IV_ARMS)
def test_intervention_keeps_the_task(matrix, arm):
    for row in matrix["interventions"][arm]["per_seed"]:
        assert row["persona"]["in_task_ratio"] >= 0.8, row


@pytest.mark.parametrize("arm", om.IV_ARMS)
def test_intervention_prevents_em_threefold(matrix, arm):
    for row in matrix["interventions"][arm]["per_seed"]:
        assert row["persona"]["fold_reduction"] >= 3, row


@pytest.mark.parametrize("arm", om.IV_ARMS)
def test_random_directions_do_not(matrix, arm):
    rows = matrix["interventions"][arm]["per_seed"]
    for row in rows:
        assert len(row["random"]) == matrix["config"]["n_random_train"]
        assert all(r["fold_reduction"] < 2 for r in row["random"]), row["random"]


def test_base_projection_is_reported(matrix):
    for arm in om.IV_ARMS:
        for row in matrix["interventions"][arm]["per_seed"]:
            proj = row["persona"]["base_projection"]
            assert proj and all(math.isfinite(v) for v in proj.values())
