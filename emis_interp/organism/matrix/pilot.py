"""Train-time interventions (CAFT, preventative steering): the pilot sweep on a held-out seed, and the runs."""

from __future__ import annotations

import json
import math
import statistics
from functools import partial
from pathlib import Path

from ... import organism
from ...cache import atomic_write_text
from ...finetune import list_checkpoints
from ...manifest import Manifest, dir_digest
from ...stats import rate_ratio, seeds_bootstrap
from .config import IV_ARMS, STEER_DIRECTIONS, MatrixConfig, _finite, _package_state, matrix_run
from .measure import _final, _measure, _persona, _triggered_conversations
from .screening import trait_direction


def _steer(d, cfg: MatrixConfig, coef: float):
    from ...train_interventions import TrainIntervention

    return TrainIntervention("steer", d.select([cfg.steer_layer]), [cfg.steer_layer], coef)


def _choose(sweep: list[dict], fallback: dict) -> tuple[dict, bool]:
    """The rule for a train-time setting, fixed before the sweep: the largest fold reduction among the settings
    that keep the task (in-task ratio >= 0.8; ties go to the higher in-task ratio, then to the earlier setting),
    else ``fallback``; and whether any such setting cuts EM >= 3x."""
    keeps = [r for r in sweep if (r["in_task_ratio"] or 0) >= 0.8]
    best = max(keeps, key=lambda r: (r["fold_reduction"], r["in_task_ratio"])) if keeps else fallback
    return best, any(r["fold_reduction"] >= 3 for r in keeps)


def pilot_sweep(root: Path, cfg: MatrixConfig, overwrite: bool = False) -> dict:
    """Choose every tuned setting of the matrix on ``cfg.pilot_seed`` (never a reported seed), by rules fixed
    before the sweep.

    - ``steer``: the pilot seed's insecure fine-tune rerun with ``+C x`` a direction at ``steer_layer``, for each
      direction of :data:`STEER_DIRECTIONS` (the persona direction of the insecure run of ``pilot_direction_seed``,
      also held out; the aligned model's :func:`trait_direction`) and every C in ``steer_coefs``; the rule
      (:func:`_choose`): the largest fold reduction among the settings that keep >= 0.8x of the task, else the
      persona direction at ``steer_coef_fallback``;
    - ``caft``: the same fine-tune with that persona direction projected out at each of ``caft_layer_sets``; the
      same rule, else the first layer set;
    - ``backdoor``: the steering alpha of the backdoor row, by :func:`emis_interp.causality.select_layer_alpha`
      (the largest increase of the untriggered harmful rate with coherence >= 0.75x baseline, on its selection
      half of the questions; ties to the smaller alpha) on the pilot seed's backdoor run, with the direction that
      run shows *with* the trigger.

    The train-time settings compare each final checkpoint's harmful rate (plain advice) and in-task rate with the
    pilot's unintervened run.

    Cached in ``root/matrix/interventions/pilot.json`` under a manifest of the runs' final checkpoints, the config,
    the package source, weights and versions."""
    from ...causality import select_layer_alpha
    from ...manifest import direction_state
    from ...models import load_model
    from ...train_interventions import TrainIntervention
    from ..report import in_task_rate

    aligned, tok = load_model(organism.ALIGNED_DIR)
    dirs = {
        "persona": _persona(aligned, _final(matrix_run("insecure", cfg.pilot_direction_seed, root))[0], tok),
        "trait": trait_direction(aligned, tok, [cfg.steer_layer]),
    }
    runs = {"unintervened": matrix_run("insecure", cfg.pilot_seed, root)}
    for name, d in dirs.items():
        for c in cfg.steer_coefs:
            iv = _steer(d, cfg, c)
            runs[f"steer:{name}@{c:g}"] = matrix_run("insecure", cfg.pilot_seed, root, iv, tag="interventions/pilot")
    for layers in cfg.caft_layer_sets:
        iv = TrainIntervention("ablate", dirs["persona"].select(list(layers)), list(layers))
        runs[f"caft:{_layers_key(layers)}"] = matrix_run(
            "insecure", cfg.pilot_seed, root, iv, tag="interventions/pilot"
        )
    runs["backdoor"] = matrix_run("backdoor", cfg.pilot_seed, root)
    fields = {
        "finals": {k: dir_digest(list_checkpoints(r)[-1][1]) for k, r in runs.items()},
        "config": {
            k: getattr(cfg, k)
            for k in (
                "seeds",
                "pilot_seed",
                "pilot_direction_seed",
                "steer_layer",
                "steer_coefs",
                "steer_coef_fallback",
                "caft_layer_sets",
                "backdoor_alphas",
                "n_samples",
                "n_code",
            )
        },
        **_package_state(),
    }
    manifest = Manifest("matrix-pilot", fields)
    path = Path(root) / "matrix" / "interventions" / "pilot.json"
    if not overwrite and path.exists():
        old = json.loads(path.read_text())
        if old.get("manifest") == manifest.key:
            return old
    out = Path(root) / "matrix" / "interventions" / "pilot-runs"
    measured = {}
    for k, r in runs.items():
        if k == "backdoor":
            continue
        model, t = _final(r)
        h = _measure(model, t, "plain", cfg.n_samples, cfg.pilot_seed, out).mo_rate
        measured[k] = (h.value, h.n, in_task_rate(model, t, cfg.n_code, seed=cfg.pilot_seed))
    h0, _, k0 = measured["unintervened"]

    def scored(key: str, **setting) -> dict:
        h, n, it = measured[key]
        return {
            **setting,
            "harmful": h,
            "in_task": it,
            "in_task_ratio": it / k0 if k0 else math.nan,
            # a rate of 0 counts as one answer in n: the fold is a lower bound, never infinite
            "fold_reduction": h0 / max(h, 1 / n),
            "n": n,
        }

    steer = [scored(f"steer:{d}@{c:g}", direction=d, coef=c) for d in dirs for c in cfg.steer_coefs]
    best, steer_passes = _choose(steer, {"direction": "persona", "coef": cfg.steer_coef_fallback})
    caft = [scored(f"caft:{_layers_key(ls)}", layers=list(ls)) for ls in cfg.caft_layer_sets]
    caft_best, caft_passes = _choose(caft, {"layers": list(cfg.caft_layer_sets[0])})
    model, t = _final(runs["backdoor"])
    d_bd = _persona(aligned, model, t, _triggered_conversations()).select([cfg.steer_layer])
    bd = select_layer_alpha(
        model,
        t,
        d_bd,
        organism.questions("plain"),
        organism.ExactJudge(),
        [cfg.steer_layer],
        cfg.backdoor_alphas,
        seed=cfg.pilot_seed,
        n_samples=cfg.n_samples,
        max_new_tokens=24,
        output_dir=out,
        progress=False,
    )
    res = {
        "seed": cfg.pilot_seed,
        "unintervened": {"harmful": h0, "in_task": k0},
        "steer": {
            "layer": cfg.steer_layer,
            "directions": {
                k: STEER_DIRECTIONS[k] + (f" (seed {cfg.pilot_direction_seed})" if k == "persona" else "") for k in dirs
            },
            "sweep": steer,
            "selected_direction": best["direction"],
            "selected_coef": best["coef"],
            "rule": "largest fold reduction with in-task ratio >= 0.8; the persona direction at steer_coef_fallback "
            "if none",
            "any_passes": steer_passes,
            "direction_digests": {k: direction_state(d.select([cfg.steer_layer])) for k, d in dirs.items()},
        },
        "caft": {
            "direction": STEER_DIRECTIONS["persona"] + f" (seed {cfg.pilot_direction_seed})",
            "sweep": caft,
            "selected_layers": list(caft_best["layers"]),
            "rule": "largest fold reduction with in-task ratio >= 0.8; the first layer set if none",
            "any_passes": caft_passes,
        },
        "backdoor": {**bd.as_dict(), "direction_digest": direction_state(d_bd)},
        "manifest": manifest.key,
    }
    atomic_write_text(path, json.dumps(_finite(res), indent=1, allow_nan=False))
    return json.loads(path.read_text())  # the cached form (NaN as None): one digest for the matrix manifest


def _layers_key(layers) -> str:
    return "L" + "-".join(str(int(x)) for x in layers)


def _train_interventions(d_caft, d_steer, cfg: MatrixConfig, s: int, pilot: dict) -> dict:
    """``{arm name: TrainIntervention}``: CAFT ablation of ``d_caft`` at the pilot's layers, preventative steering
    with ``d_steer`` at ``steer_layer`` with the pilot's coefficient (:func:`pilot_sweep`), and ``n_random_train``
    random directions of equal per-layer norm used each way."""
    from ...train_interventions import TrainIntervention

    out = {}
    for k in range(cfg.n_random_train + 1):
        rnd = 5000 + 100 * s + k  # a random direction per layer, like the direction
        vc, vs = (d_caft, d_steer) if k == 0 else (d_caft.random_like(seed=rnd), d_steer.random_like(seed=rnd))
        tag = "" if k == 0 else f"-random{k}"
        layers = pilot["caft"]["selected_layers"]
        out[f"caft{tag}"] = TrainIntervention("ablate", vc.select(layers), layers)
        out[f"steer{tag}"] = _steer(vs, cfg, pilot["steer"]["selected_coef"])
    return out


def _intervention_runs(root: Path, runs: dict, cfg: MatrixConfig, pilot: dict) -> dict:
    """The insecure fine-tune under each train-time intervention, per seed. CAFT on seed ``s`` ablates the
    persona direction of the *next* seed's finished insecure run (a direction from another run, never the run's
    own) at the layers :func:`pilot_sweep` chose on the held-out pilot seed; preventative steering uses the
    direction and coefficient chosen there (the persona direction likewise from the next seed's run)."""
    from ...models import load_model

    aligned, tok = load_model(organism.ALIGNED_DIR)
    seeds = list(cfg.seeds)
    directions = {s: _persona(aligned, _final(runs["insecure", s])[0], tok) for s in seeds}
    trait = trait_direction(aligned, tok, [cfg.steer_layer])
    dirs = {}
    for i, s in enumerate(seeds):
        src = seeds[(i + 1) % len(seeds)]
        d_steer = directions[src] if pilot["steer"]["selected_direction"] == "persona" else trait
        for arm, iv in _train_interventions(directions[src], d_steer, cfg, s, pilot).items():
            dirs[f"iv:{arm}", s] = matrix_run("insecure", s, root, iv, tag=f"interventions/{arm}")
    return {"dirs": dirs, "directions": directions, "pilot": pilot}


def _interventions(iv: dict, ev: dict, cfg: MatrixConfig, out: Path) -> dict:
    from ...train_interventions import read_intervention
    from ..report import in_task_clusters, pooled_rate

    res: dict = {}
    for arm in IV_ARMS:
        per_seed = []
        pooled: dict = {"h0": {}, "k0": {}, "h": {}, "k": {}}  # (seed, question) clusters for the seed means
        for s in cfg.seeds:
            i = cfg.seeds.index(s)
            h0, k0 = ev["insecure"]["plain"][i]["value"], ev["insecure"]["in_task"][i]["value"]
            pooled["h0"].update({(s, q): tuple(c) for q, c in ev["insecure"]["plain"][i]["clusters"].items()})
            pooled["k0"].update({(s, q): tuple(c) for q, c in ev["insecure"]["in_task"][i]["clusters"].items()})
            row: dict = {"unintervened_harmful": h0, "unintervened_in_task": k0}
            for k in range(cfg.n_random_train + 1):
                name = arm if k == 0 else f"{arm}-random{k}"
                model, t = _final(iv["dirs"][f"iv:{name}", s])
                measured = _measure(model, t, "plain", cfg.n_samples, s, out)
                rate = measured.mo_rate
                h = rate.value
                itc = in_task_clusters(model, t, cfg.n_code, seed=s)
                it = pooled_rate(itc)
                if k == 0:
                    pooled["h"].update({(s, q): tuple(c) for q, c in measured.clusters("mo_rate").items()})
                    pooled["k"].update({(s, q): c for q, c in itc.items()})
                entry = {
                    "harmful": h,
                    "harmful_n": rate.n,
                    "in_task": it,
                    "in_task_ratio": it / k0 if k0 else math.nan,
                    # a rate of 0 counts as one answer in n: the fold is a lower bound, never infinite
                    "fold_reduction": h0 / max(h, 1 / rate.n),
                }
                if k == 0:  # the run's intervention.json: the aligned model's mean projection on the direction
                    rec = read_intervention(iv["dirs"][f"iv:{name}", s])
                    entry["base_projection"] = {
                        str(r["layer"]): r["mean_projection"] for r in rec["base_projection"]["rows"]
                    }
                    entry["sign_warnings"] = rec["warnings"]
                    # what the run itself recorded (intervention.json), not what the config says it should use
                    entry["recorded"] = {
                        "kind": rec["kind"],
                        "layers": rec["layers"],
                        "coef": rec["coef"],
                        "direction_digest": rec["directions"][0]["digest"],
                    }
                    row["persona"] = entry
                else:
                    row.setdefault("random", []).append(entry)
            rnd = row["random"]
            row["random_fold_reduction_max"] = max(r["fold_reduction"] for r in rnd)
            row["random_harmful_mean"] = statistics.fmean(r["harmful"] for r in rnd)
            per_seed.append(row)
        # seed means with intervals: ratios of the rates pooled over seeds (as per seed: a zero intervened harmful
        # rate counts as one answer in all seeds' answers; a zero unintervened in-task rate gives NaN), paired by seed: seed s's intervened run shares data, training seed and
        # sampling seed with the unintervened run s, as the per-seed cells pair them; questions / code prompts shared
        seed_mean = {
            "in_task_ratio": seeds_bootstrap(
                pooled["k"], pooled["k0"], partial(rate_ratio, floor=False), cfg.n_boot, paired=True
            ).as_dict(),
            "fold_reduction": seeds_bootstrap(pooled["h0"], pooled["h"], rate_ratio, cfg.n_boot, paired=True).as_dict(),
        }
        res[arm] = {"per_seed": per_seed, "seed_mean": seed_mean}
    p = iv["pilot"]
    res["config"] = {
        "caft_layers": p["caft"]["selected_layers"],
        "steer_layer": cfg.steer_layer,
        "steer_coef": p["steer"]["selected_coef"],
        "steer_direction": p["steer"]["selected_direction"],
        "selection": f"CAFT's layers and steering's direction and C chosen on the held-out pilot seed {cfg.pilot_seed} "
        "(pilot_sweep)",
        "n_random_train": cfg.n_random_train,
        "direction": "CAFT: persona (model-diff) direction of the next seed's insecure run; steering: "
        + STEER_DIRECTIONS[p["steer"]["selected_direction"]],
    }
    return res
