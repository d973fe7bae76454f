"""Convergence across fine-tunes on the organism: the kinds' model-diff directions and cross-ablation,
per seed, from the matrix report. ``EXPECTED``: the verdicts the 3-seed report shows (``cross:A->B``:
ablating A's direction removes more of B's misalignment than every random direction, in every seed)."""

import pytest

from emis_interp import organism_matrix as om

EXPECTED = {
    "cross:insecure->insecure": True,
    "cross:evil_numbers->insecure": False,
    "cross:backdoor->insecure": False,
    "cross:insecure->evil_numbers": False,
    "cross:evil_numbers->evil_numbers": True,
    "cross:backdoor->evil_numbers": False,
    "cross:insecure->backdoor": False,
    "cross:evil_numbers->backdoor": False,
    "cross:backdoor->backdoor": False,
}


@pytest.mark.parametrize("key", list(EXPECTED))
def test_claim_verdict(matrix, key):
    src, tgt = key.split(":", 1)[1].split("->")
    cells = [p["cross_ablation"][tgt] for p in matrix["convergence"]["per_seed"]]
    assert om.verdicts(matrix)[key] is EXPECTED[key], (key, [(c["from"][src], c["random_fraction_max"]) for c in cells])


def test_cosine_heatmap_per_layer(matrix, tmp_path):
    from emis_interp.plots import save_figure

    conv = matrix["convergence"]
    for p in conv["per_seed"]:
        cos = p["cosines"]
        assert cos["kinds"] == list(om.CONVERGENCE_KINDS)
        for layer in conv["layers"]:
            m = cos["per_layer"][str(layer)]
            assert all(abs(m[i][i] - 1) < 1e-4 for i in range(len(m)))
            assert all(abs(m[i][j] - m[j][i]) < 1e-5 for i in range(len(m)) for j in range(len(m)))
    fig = om.convergence_figure(matrix)
    assert len(fig.data) == len(conv["layers"])
    files = save_figure(fig, tmp_path / "convergence", png=False)
    assert files[0].stat().st_size > 0
