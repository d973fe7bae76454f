"""Convergence across fine-tunes: cosines of the kinds' directions and the cross-ablation matrix."""

from __future__ import annotations

import math
import statistics
from pathlib import Path

from ... import organism
from ...causality import run_arms
from ...sampling import Condition
from .config import CONVERGENCE_KINDS, CROSS_KINDS, MatrixConfig
from .measure import _persona


def _cosines(dirs: dict, layers) -> dict:
    import torch

    names = list(dirs)
    out = {}
    for layer in layers:
        u = torch.stack([dirs[n].unit(layer).float() for n in names])
        out[str(layer)] = (u @ u.T).tolist()
    return {"kinds": names, "per_layer": out}


def _convergence(models: dict, aligned, tok, ev: dict, cfg: MatrixConfig, out: Path) -> dict:
    """Per seed: the kinds' model-diff directions (cosines per layer) and the cross-ablation matrix, by
    zero-ablation (the direction's component removed) and by mean-ablation (set to the aligned model's mean
    projection on the direction set, :class:`emis_interp.sampling.Condition` ``ablate_to``), each against random
    directions ablated the same way."""
    from ...stats import rank_p_value
    from ...train_interventions import mean_projection, mean_residual

    layers = list(range(aligned.config.num_hidden_layers))
    convs = organism.direction_conversations()
    mean = mean_residual(aligned, tok, convs, layers, n_examples=len(convs))  # the mean-ablation reference
    per_seed = []
    for i, s in enumerate(cfg.seeds):
        dirs = {k: _persona(aligned, models[k][s][0], tok, convs) for k in CONVERGENCE_KINDS}
        cos = _cosines(dirs, layers)
        cross: dict = {}
        proj = {src: mean_projection(mean, layers, dirs[src]) for src in CROSS_KINDS}
        for target, fmt in CROSS_KINDS.items():
            model, t = models[target][s]
            rand = [dirs[target].random_like(seed=9000 + 100 * s + k) for k in range(cfg.n_random_cross)]
            rproj = [mean_projection(mean, layers, r) for r in rand]
            arms = [Condition("baseline")]
            arms += [Condition(f"from-{src}", "ablate", dirs[src], 0.0, None) for src in CROSS_KINDS]
            arms += [Condition(f"random-ablate#{k}", "ablate", r, 0.0, None) for k, r in enumerate(rand)]
            # mean-ablation in its own sweep, so the zero-ablation arms sample exactly as they did without it
            mean_arms = [
                Condition(f"mean-from-{src}", "ablate", dirs[src], ablate_to=tuple(proj[src].items()))
                for src in CROSS_KINDS
            ]
            mean_arms += [
                Condition(f"random-ablate#{k}", "ablate", r, ablate_to=tuple(rp.items()))
                for k, (r, rp) in enumerate(zip(rand, rproj, strict=True))
            ]
            res, res_m = (
                run_arms(
                    model,
                    t,
                    organism.questions(fmt),
                    a,
                    organism.ExactJudge(),
                    n_samples=cfg.n_cross,
                    max_new_tokens=24,
                    seed=s,
                    output_dir=out,
                    progress=False,
                )
                for a in (arms, mean_arms)
            )
            base = res.arm("baseline").mo_rate.value
            floor = ev["aligned"][fmt][i]["value"]  # the aligned model's harmful rate in the same format
            span = base - floor

            def frac(a, base=base, span=span):
                return (base - a.mo_rate.value) / span if span > 0 else math.nan

            rnd = [frac(a) for a in res.arms if a.name.startswith("random-ablate#")]
            rnd_mean = [frac(a) for a in res_m.arms if a.name.startswith("random-ablate#")]
            row = {}
            for src in CROSS_KINDS:
                f = frac(res.arm(f"from-{src}"))
                _, p = rank_p_value(f, rnd, alternative="greater")
                fm = frac(res_m.arm(f"mean-from-{src}"))
                _, pm = rank_p_value(fm, rnd_mean, alternative="greater")
                row[src] = {
                    "fraction_removed": f,
                    "p_value": p,
                    "fraction_removed_mean": fm,
                    "p_value_mean": pm,
                    "aligned_projection": {str(k): v for k, v in proj[src].items()},
                }
            cross[target] = {
                "format": fmt,
                "baseline": base,
                "aligned": floor,
                "from": row,
                "random_fraction_mean": statistics.fmean(rnd),
                "random_fraction_max": max(rnd),
                "random_mean_fraction_mean": statistics.fmean(rnd_mean),
                "random_mean_fraction_max": max(rnd_mean),
                "random_aligned_projection_abs_max": max(abs(v) for rp in rproj for v in rp.values()),
            }
        per_seed.append({"cosines": cos, "cross_ablation": cross})
    mean_ref = {"reference": "aligned", "conversations": "organism.direction_conversations()", "n": len(convs)}
    return {"layers": layers, "k_random": cfg.n_random_cross, "mean_ablation": mean_ref, "per_seed": per_seed}
