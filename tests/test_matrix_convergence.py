"""Convergence across fine-tunes on the organism: the kinds' model-diff directions and cross-ablation,
per seed, from the matrix report. ``EXPECTED``: the verdicts the 3-seed report shows (``cross:A->B``:
ablating A's direction removes more of B's misalignment than every random direction, in every seed)."""

import pytest

from emis_interp.organism import matrix as om
from emis_interp.organism.matrix import measure

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
    # mean-ablation (exploratory: added after the zero-ablation rows above had failed)
    "cross_mean:insecure->insecure": False,
    "cross_mean:evil_numbers->insecure": True,
    "cross_mean:backdoor->insecure": True,
    "cross_mean:insecure->evil_numbers": False,
    "cross_mean:evil_numbers->evil_numbers": True,
    "cross_mean:backdoor->evil_numbers": True,
    "cross_mean:insecure->backdoor": False,
    "cross_mean:evil_numbers->backdoor": False,
    "cross_mean:backdoor->backdoor": False,
}


@pytest.mark.science  # needs organism fine-tunes
@pytest.mark.parametrize("key", list(EXPECTED))
def test_claim_verdict(matrix, key):
    src, tgt = key.split(":", 1)[1].split("->")
    cells = [p["cross_ablation"][tgt] for p in matrix["convergence"]["per_seed"]]
    rnd = "random_mean_fraction_max" if key.startswith("cross_mean:") else "random_fraction_max"
    assert om.verdicts(matrix)[key] is EXPECTED[key], (key, [(c["from"][src], c[rnd]) for c in cells])


@pytest.mark.science  # needs organism fine-tunes
def test_mean_ablation_uses_the_aligned_models_mean_projection(matrix):
    """The mean-ablation reference is recomputed here from the aligned model and seed 0's insecure run: the
    direction set's mean residual in the aligned model, projected on the run's model-diff direction per layer."""
    from emis_interp import organism
    from emis_interp.directions import model_diff
    from emis_interp.models import load_model
    from emis_interp.train_interventions import mean_residual

    conv = matrix["convergence"]
    s = matrix["config"]["seeds"][0]
    aligned, tok = load_model(organism.ALIGNED_DIR)
    run = om.run_root(organism.DEFAULT_TRAJECTORY_DIR, "insecure") / f"insecure-s{s}"
    tuned, _ = measure._final(run)
    convs = organism.direction_conversations()
    layers = conv["layers"]
    d = model_diff(aligned, tuned, tok, convs, layers, "mean_response", cache_dir=None, progress=False)
    mean = mean_residual(aligned, tok, convs, layers, n_examples=len(convs))
    got = conv["per_seed"][0]["cross_ablation"]["insecure"]["from"]["insecure"]["aligned_projection"]
    for i, layer in enumerate(layers):
        assert got[str(layer)] == pytest.approx(float(mean[i] @ d.unit(layer)), abs=1e-4), layer
    # one reference per direction: the same values whichever run it is ablated in
    for tgt in om.CROSS_KINDS:
        assert conv["per_seed"][0]["cross_ablation"][tgt]["from"]["insecure"]["aligned_projection"] == got


@pytest.mark.science  # needs organism fine-tunes
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
