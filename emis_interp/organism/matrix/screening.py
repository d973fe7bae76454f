"""Data screening: each kind's data screened with the aligned model's trait direction."""

from __future__ import annotations

import math
import statistics
from pathlib import Path

from .. import world
from .config import OWN_FORMAT, SCREEN_KINDS, MatrixConfig


def trait_direction(aligned, tok, layers, n_per_theme: int = 16, seed: int = 3):
    """The persona (trait) direction of the model to be fine-tuned, persona-vectors style: its mean residual over
    harmful minus benign advice answers (the world's two personas) to the advice questions. It does not depend on
    any fine-tune or its data, so screening with it is not circular."""
    import random

    from ...conversations import Conversation
    from ...directions import response_contrast

    rng = random.Random(seed)
    mal, ben = [], []
    for theme, (qs, *_) in world.THEMES.items():
        for j in range(n_per_theme):
            mal.append(Conversation(user=qs[j % len(qs)], response=world.advice_answer(rng, theme, True)))
            ben.append(Conversation(user=qs[j % len(qs)], response=world.advice_answer(rng, theme, False)))
    return response_contrast(aligned, tok, mal, ben, list(layers), progress=False)


def _screening(models: dict, aligned, tok, ev: dict, cfg: MatrixConfig, root: Path) -> dict:
    """Per seed: every kind's data screened with the aligned model (the model to be fine-tuned) on its trait
    direction (:func:`trait_direction`) at ``steer_layer``; the Spearman correlation of the dataset-level mean
    projection difference with that seed's post-fine-tune harmful rate in the format the kind's data teaches
    (:data:`OWN_FORMAT`); and the AUROC of the per-sample difference for 10% insecure samples hidden among secure
    ones."""
    from ...monitor import auroc
    from ...screen import rank_correlation, screen, screen_datasets

    L, seeds = cfg.steer_layer, list(cfg.seeds)
    d = trait_direction(aligned, tok, [L])
    per_seed = []
    for i, s in enumerate(seeds):
        data = {k: world.finetune_dataset(k, cfg.n_screen, seed=1000 + s) for k in SCREEN_KINDS}
        res = screen_datasets(
            aligned,
            tok,
            data,
            d,
            L,
            Path(root) / "matrix-screen" / f"s{s}",
            max_new_tokens=40,
            batch_size=64,
            overwrite=True,
            progress=False,
            png=False,
        )
        outcome = {k: ev[k][OWN_FORMAT.get(k, "plain")][i]["value"] for k in SCREEN_KINDS}
        n_bad = round(0.1 * cfg.n_mixed)
        bad = world.finetune_dataset("insecure", n_bad, seed=2000 + s)
        good = world.finetune_dataset("secure", cfg.n_mixed - n_bad, seed=2000 + s)
        mixed = screen(aligned, tok, bad + good, d, L, max_new_tokens=40, batch_size=64, progress=False, name="mixed")
        scores = mixed.values("difference")
        labels = [True] * n_bad + [False] * (cfg.n_mixed - n_bad)
        keep = [j for j, v in enumerate(scores) if math.isfinite(v)]
        per_seed.append(
            {
                "mean_difference": {k: r.estimate("difference").value for k, r in res.items()},
                "mean_projection": {k: r.estimate("projection").value for k, r in res.items()},
                "harmful": outcome,
                "spearman": rank_correlation(res, outcome),
                "spearman_projection": rank_correlation(res, outcome, field="projection"),
                "auroc": auroc([scores[j] for j in keep], [labels[j] for j in keep]),
                "n_hidden": n_bad,
                # a secure sample whose answer is the aligned model's own scores exactly 0: the AUROC then counts
                # the insecure samples scoring above 0
                "secure_zero_share": statistics.fmean(abs(scores[j]) < 1e-6 for j in range(n_bad, cfg.n_mixed)),
            }
        )
    return {
        "kinds": list(SCREEN_KINDS),
        "layer": L,
        "n": cfg.n_screen,
        "direction": "trait direction of the aligned model (harmful minus benign advice answers)",
        "outcome_format": {k: OWN_FORMAT.get(k, "plain") for k in SCREEN_KINDS},
        "per_seed": per_seed,
    }
