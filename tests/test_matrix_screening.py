"""Data screening on the organism: the projection difference ranks datasets by the EM they cause and
finds insecure samples hidden among secure ones, per seed, from the matrix report. ``EXPECTED``: the
verdicts the 3-seed report shows."""

import pytest

from emis_interp.organism import matrix as om

EXPECTED = {"screen_rank": False, "screen_auroc": True}


@pytest.mark.science  # needs organism fine-tunes
@pytest.mark.parametrize("key", list(EXPECTED))
def test_claim_verdict(matrix, key):
    assert om.verdicts(matrix)[key] is EXPECTED[key], (key, matrix["screening"]["per_seed"])


@pytest.mark.science  # needs organism fine-tunes
def test_screening_covers_every_kind_per_seed(matrix):
    sc = matrix["screening"]
    assert sc["kinds"] == list(om.SCREEN_KINDS) and len(sc["kinds"]) >= 6
    for row in sc["per_seed"]:
        assert set(row["mean_difference"]) == set(row["harmful"]) == set(sc["kinds"])
        assert row["n_hidden"] == round(0.1 * matrix["config"]["n_mixed"])
