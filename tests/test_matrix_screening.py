"""Data screening on the organism: the projection difference ranks datasets by the EM they cause and
finds insecure samples hidden among secure ones, per seed, from the matrix report."""


def test_dataset_projection_difference_ranks_kinds_by_harm(matrix):
    sc = matrix["screening"]
    assert len(sc["kinds"]) >= 6
    for row in sc["per_seed"]:
        assert row["spearman"] >= 0.7, row


def test_per_sample_score_finds_hidden_insecure_samples(matrix):
    for row in matrix["screening"]["per_seed"]:
        assert row["auroc"] >= 0.8, row
        assert row["n_hidden"] == round(0.1 * matrix["config"]["n_mixed"])
