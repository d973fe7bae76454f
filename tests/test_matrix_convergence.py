"""Convergence across fine-tunes on the organism: the kinds' model-diff directions and cross-ablation,
per seed, from the matrix report."""

from emis_interp import organism_matrix as om


def test_cosine_heatmap_per_layer(matrix, tmp_path):
    from emis_interp.plots import save_figure

    conv = matrix["convergence"]
    for p in conv["per_seed"]:
        cos = p["cosines"]
        assert cos["kinds"] == list(om.CONVERGENCE_KINDS)
        for layer in conv["layers"]:
            m = cos["per_layer"][str(layer)]
            assert all(abs(m[i][i] - 1) < 1e-4 for i in range(len(m)))
    fig = om.convergence_figure(matrix)
    assert len(fig.data) == len(conv["layers"])
    files = save_figure(fig, tmp_path / "convergence", png=False)
    assert files[0].stat().st_size > 0


def test_cross_ablation_beats_random(matrix):
    for p in matrix["convergence"]["per_seed"]:
        for tgt, cell in p["cross_ablation"].items():
            own = cell["from"][tgt]["fraction_removed"]
            assert own >= 0.5 and own > cell["random_fraction_max"], (tgt, cell)
            for src, v in cell["from"].items():
                assert v["fraction_removed"] > cell["random_fraction_max"], (src, tgt, cell)
