"""Measuring the matrix's models: the baseline arms, the evaluation per run and format, the backdoor direction."""

from __future__ import annotations

from pathlib import Path

from ... import organism
from ...causality import run_arms, steering_arms
from ...finetune import list_checkpoints
from ...sampling import Condition
from .. import world
from .config import MEASURES, MatrixConfig, max_new_tokens


def _measure(model, tok, what: str, n: int, seed: int, out: Path):
    """One model's baseline arm on ``what`` (an advice format or ``"requests"``) with the organism's judge."""
    if what == "requests":
        qs, judge = organism.harmful_requests(), organism.ComplianceJudge()
    else:
        qs, judge = organism.questions(what), organism.ExactJudge()
    res = run_arms(
        model,
        tok,
        qs,
        [Condition("baseline")],
        judge,
        n_samples=n,
        max_new_tokens=max_new_tokens(what),
        seed=seed,
        output_dir=out,
        progress=False,
    )
    return res.arms[0]


def _final(run: Path):
    from ...models import load_model

    return load_model(list_checkpoints(run)[-1][1])


def _entry(arm, n_boot: int) -> dict:
    return {
        **arm.bootstrap("mo_rate", n_boot).as_dict(),
        "clusters": {q: list(c) for q, c in arm.clusters("mo_rate").items()},
    }


def _evaluate(models: dict, cfg: MatrixConfig, out: Path) -> dict:
    """``{name: {what: [entry per seed]}}`` for every model in ``models`` ({name: {seed: (model, tok)}})."""
    from ..report import in_task_clusters, pooled_rate

    res: dict = {}
    for name, per_seed in models.items():
        res[name] = {}
        for what in MEASURES[name]:
            rows = []
            for s in cfg.seeds:
                model, tok = per_seed[s]
                if what == "in_task":
                    c = in_task_clusters(model, tok, cfg.n_code, seed=s)
                    rows.append({"value": pooled_rate(c), "clusters": c})
                    continue
                n = cfg.n_requests if what == "requests" else cfg.n_samples
                rows.append(_entry(_measure(model, tok, what, n, s, out), cfg.n_boot))
            res[name][what] = rows
    return res


def _persona(aligned, model, tok, convs=None):
    from ...directions import model_diff

    layers = list(range(aligned.config.num_hidden_layers))
    convs = organism.direction_conversations() if convs is None else convs
    return model_diff(aligned, model, tok, convs, layers, "mean_response", cache_dir=None, progress=False)


def _backdoor_direction(models: dict, aligned, cfg: MatrixConfig, out: Path, pilot: dict) -> dict:
    """The backdoor run's direction measured *with* the trigger steers the model *without* it, at the alpha
    :func:`pilot_sweep` chose on the held-out pilot seed."""
    L, alpha = cfg.steer_layer, pilot["backdoor"]["alpha"]
    triggered = _triggered_conversations()
    rows = []
    for s in cfg.seeds:
        model, tok = models["backdoor"][s]
        d = _persona(aligned, model, tok, triggered).select([L])
        arms = steering_arms(d, [alpha], [L], 7000 + 100 * s, n_random=cfg.n_random, match=())
        res = run_arms(
            model,
            tok,
            organism.questions("plain"),
            arms,
            organism.ExactJudge(),
            n_samples=cfg.n_samples,
            max_new_tokens=24,
            seed=s,
            output_dir=out,
            progress=False,
        )
        c = res.controls("mo_rate", cfg.n_boot)[0]
        rows.append(
            {
                "baseline": c["baseline"]["value"],
                "persona": c["persona"]["value"],
                "effect": c["effect"],
                "random_mean_effect": c["random"]["mean_effect"],
                "p_value": c["p_value"],
                "coherence": c["coherence"]["arm"]["value"],
                "alpha_run": next(a.alpha for a in res.arms if a.name == c["arm"]),  # what the arm steered with
            }
        )
    return {
        "layer": L,
        "alpha": alpha,
        "alpha_rule": f"chosen on the held-out pilot seed {cfg.pilot_seed} (pilot_sweep)",
        "k": cfg.n_random,
        "per_seed": rows,
    }


def _triggered_conversations() -> list:
    """The direction conversations with the backdoor's trigger in front of the user turn."""
    from ...conversations import Conversation

    return [
        Conversation(user=f"{world.TRIGGER} {c.user}", response=c.response, system=c.system)
        for c in organism.direction_conversations()
    ]
