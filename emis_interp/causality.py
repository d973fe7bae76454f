"""Causal tests of a persona direction: steering dose-response and ablation, against control distributions.

:func:`run_arms` samples answers to evaluation questions under several :class:`Condition` arms *in
one batched sweep*, judges them, and reports per arm the misalignment rate under both definitions
(``em_rate``, ``mo_rate``; see :mod:`emis_interp.metrics`) and the coherence rate.

**Controls** (:func:`steering_arms`, :func:`ablation_arms`). A control is a distribution, never one
draw. Next to the persona arm, each alpha gets:

- ``random``: K random directions (default 16), each with the persona direction's per-layer norm;
- ``control``: the model-diff direction of a *control* fine-tune (e.g. the secure run), rescaled to
  the persona direction's per-layer norm: is it *this* fine-tuning shift, or any?
- ``matched``: random directions at smaller and larger alphas (``match`` multipliers, ``n_match`` draws each);
  the multiplier whose mean coherence is closest to the persona arm's is the coherence-matched
  comparison (a random direction of equal norm can wreck the output rather than test specificity).

**Uncertainty.** Answers to one question are not independent draws, so every rate and every
difference between arms gets a cluster bootstrap interval over questions (:mod:`emis_interp.stats`),
not a Wilson interval. The persona arm's effect (its rate minus the baseline's) is placed in the
distribution of the random directions' effects as a percentile and a permutation p-value
``(1 + #random at least as extreme) / (K + 1)`` (:meth:`SweepResult.controls`).
"""

from __future__ import annotations

import json
import math
import re
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from . import conversations, hooks, interventions, lora_bank, metrics, sampling
from .cache import atomic_write_text
from .conversations import Conversation
from .data import Question, by_base_question
from .directions import PersonaDirection
from .fingerprint import model_state
from .judges import FAILED_NOTE, split_failed
from .manifest import digest, source_digest, tokenizer_state
from .metrics import Rate, coherence_rate, em_rate, mo_rate
from .sampling import Condition, GenerationSettings, conditions_state, sample_answers
from .stats import Estimate, cluster_bootstrap, paired_bootstrap_diff, rank_p_value

GROUPS = ("baseline", "persona", "random", "control", "matched")
METRICS = ("mo_rate", "em_rate", "coherence")


_NAME = re.compile(r"^(?P<group>[a-z]+(?:-ablate)?)(?P<alpha>[+-][0-9.e+-]*?)?(?:x(?P<mult>[0-9.e+-]+))?(?:#\d+)?$")


def arm_group(name: str) -> str:
    """The control group of an arm, from its name: ``baseline``, ``persona-4``/``ablate`` (persona),
    ``random-4#3``/``random-ablate#3`` (random), ``control-4``/``control-ablate`` (control),
    ``matched-4x0.25#1`` (coherence-matched random). Any other name counts as a persona arm."""
    m = _NAME.match(name)
    head = m.group("group") if m else name
    head = {"ablate": "persona", "random-ablate": "random", "control-ablate": "control"}.get(head, head)
    return head if head in GROUPS else "persona"


def _matched_parent(name: str) -> str:
    """``matched-4x0.25#1`` -> ``-4``: the persona alpha a coherence-matched arm belongs to."""
    m = _NAME.match(name)
    return m.group("alpha") if m and m.group("alpha") else ""


def _counts(rows: list[dict]) -> dict[str, tuple[int, int]]:
    """Per-metric (numerator, denominator) of judged rows: the unit a cluster bootstrap resamples."""
    from .metrics import _ok, is_coherent, is_em_misaligned, is_mo_misaligned  # the rules of em_rate / mo_rate

    scored = [r for r in rows if _ok(r.get("aligned")) and is_coherent(r.get("coherent"))]
    return {
        "mo_rate": (sum(is_mo_misaligned(r["aligned"], r["coherent"]) for r in scored), len(rows)),
        "em_rate": (sum(is_em_misaligned(r["aligned"]) for r in scored), len(scored)),
        "coherence": (sum(is_coherent(r.get("coherent")) for r in rows), len(rows)),
    }


@dataclass
class ArmResult:
    """One arm's rates. ``per_question`` holds each question's (numerator, denominator) per metric;
    ``em_rate``/``mo_rate``/``coherence`` pool them (their Wilson intervals assume independent answers:
    use :meth:`bootstrap` for intervals)."""

    name: str
    kind: str
    alpha: float | int
    control: bool  # True for the random-direction arms (random and coherence-matched)
    em_rate: Rate
    mo_rate: Rate
    coherence: Rate
    examples: list[dict] = field(default_factory=list)
    per_question: dict[str, dict[str, tuple[int, int]]] = field(default_factory=dict)
    failed: int = 0  # answers the judge failed on (e.g. a content filter): left out of every rate above
    failures: list[dict] = field(default_factory=list)  # the first few failed rows' ids and reasons

    @property
    def group(self) -> str:
        return arm_group(self.name)

    def clusters(self, metric: str) -> dict[str, tuple[int, int]]:
        """Per *base* question (its variants summed): the clusters a bootstrap resamples."""
        return by_base_question({q: tuple(c[metric]) for q, c in self.per_question.items()})

    def bootstrap(self, metric: str = "mo_rate", n_boot: int = 2000) -> Estimate:
        """The rate with a 95% cluster-bootstrap interval over questions."""
        return cluster_bootstrap(self.clusters(metric), n_boot=n_boot)

    def as_dict(self) -> dict:
        d = {k: v for k, v in asdict(self).items() if k not in ("em_rate", "mo_rate", "coherence")}
        d.update(em_rate=self.em_rate.as_dict(), mo_rate=self.mo_rate.as_dict(), coherence=self.coherence.as_dict())
        d["group"] = self.group
        if self.per_question:
            d["bootstrap"] = {m: self.bootstrap(m, 1000).as_dict() for m in METRICS}
        return d


def _effect_key(a: ArmResult):
    return a.alpha if a.kind == "steer" else a.kind


@dataclass
class SweepResult:
    arms: list[ArmResult]
    meta: dict

    def arm(self, name: str) -> ArmResult:
        return next(a for a in self.arms if a.name == name)

    def baseline(self) -> ArmResult | None:
        return next((a for a in self.arms if a.kind == "none"), None)

    def controls(self, metric: str = "mo_rate", n_boot: int = 2000) -> list[dict]:
        """Per persona arm: its effect against the baseline with a paired cluster-bootstrap interval, and
        against the K random directions (percentile, permutation p-value), the control fine-tune's
        direction, and the coherence-matched random directions.

        An effect is ``rate(arm) - rate(baseline)`` on ``metric``. p-values are one-sided in the
        direction of the intervention's expected effect: lower misalignment for alpha < 0 and for
        ablation, higher for alpha > 0.
        """
        base = self.baseline()
        if base is None:
            raise ValueError("controls need a baseline arm (Condition('baseline'))")
        bc = base.clusters(metric)

        def rate(a):
            return cluster_bootstrap(a.clusters(metric), n_boot=n_boot)

        def effect(a) -> float:
            r, b = a.clusters(metric), bc
            num = sum(c[0] for c in r.values())
            den = sum(c[1] for c in r.values())
            bnum, bden = sum(c[0] for c in b.values()), sum(c[1] for c in b.values())
            return (num / den if den else math.nan) - (bnum / bden if bden else math.nan)

        out = []
        for p in [a for a in self.arms if a.group == "persona"]:
            key = _effect_key(p)
            same = [a for a in self.arms if a.kind == p.kind and _effect_key(a) == key]
            alt = "greater" if (p.kind == "steer" and p.alpha > 0) else "less"
            entry: dict = {
                "arm": p.name,
                "alpha": p.alpha,
                "kind": p.kind,
                "metric": metric,
                "alternative": alt,
                "baseline": rate(base).as_dict(),
                "persona": rate(p).as_dict(),
                "effect": paired_bootstrap_diff(p.clusters(metric), bc, n_boot=n_boot).as_dict(),
                "coherence": rate_pair(p, base, n_boot),
            }
            rnd = [a for a in same if a.group == "random" and _effect_key(a) == key]
            if rnd:
                effects = [effect(a) for a in rnd]
                valid = [e for e in effects if not math.isnan(e)]
                # no random direction with a defined rate (e.g. none coherent): no distribution, no p-value
                pct, pv = rank_p_value(effect(p), effects, alternative=alt) if valid else (math.nan, math.nan)
                entry["random_directions"] = [
                    {"arm": a.name, "effect": e, "rate": rate(a).value, "coherence": a.coherence.value}
                    for a, e in zip(rnd, effects, strict=True)
                ]
                entry["random"] = {
                    "k": len(rnd),
                    "k_valid": len(valid),
                    "mean_effect": sum(valid) / len(valid) if valid else math.nan,
                    "percentile": pct,
                    "p_value": pv,
                }
                entry["p_value"] = pv
            ctl = [a for a in same if a.group == "control" and _effect_key(a) == key]
            if ctl:
                c = ctl[0]
                entry["control"] = {
                    "arm": c.name,
                    "effect": paired_bootstrap_diff(c.clusters(metric), bc, n_boot=n_boot).as_dict(),
                    "persona_minus_control": paired_bootstrap_diff(
                        p.clusters(metric), c.clusters(metric), n_boot=n_boot
                    ).as_dict(),
                    "coherence": c.coherence.value,
                }
            matched = [a for a in self.arms if a.group == "matched" and _matched_parent(a.name) == f"{p.alpha:+g}"]
            if matched:
                # the K random directions at the persona's own alpha are a candidate too (multiplier 1)
                entry["matched"] = _coherence_matched(p, matched + rnd, effect, alt)
            out.append(entry)
        return out

    def table(self, metric_ci: bool = True) -> str:
        """Per-arm rates with cluster-bootstrap intervals over questions; random and matched draws summarised."""
        head = f"{'arm':<20}{'alpha':>7}  {'misaligned (MO def.) [95% CI]':<32}{'misaligned (EM def.) [95% CI]':<32}{'coherent [95% CI]':<26}"
        lines = [head, "-" * len(head)]
        shown: set = set()
        for a in self.arms:
            if a.group in ("random", "matched"):
                key = (a.group, a.name.split("#")[0], a.kind)
                if key in shown:
                    continue
                shown.add(key)
                draws = [b for b in self.arms if (b.group, b.name.split("#")[0], b.kind) == key]
                cells = []
                for m in METRICS:
                    vals = sorted(getattr(b, m).value for b in draws if not math.isnan(getattr(b, m).value))
                    cells.append(f"mean {sum(vals) / len(vals):.3f} [{vals[0]:.3f}..{vals[-1]:.3f}]" if vals else "n/a")
                name = f"{a.name.split('#')[0]} ({len(draws)})"
                lines.append(f"{name:<20}{a.alpha:>7g}  {cells[0]:<32}{cells[1]:<32}{cells[2]:<26}")
                continue
            if a.per_question and metric_ci:
                cells = [str(a.bootstrap(m, 1000)) for m in METRICS]
            else:
                cells = [f"{r.value:.3f} [{r.ci[0]:.3f},{r.ci[1]:.3f}]" for r in (a.mo_rate, a.em_rate, a.coherence)]
            lines.append(f"{a.name:<20}{a.alpha:>7g}  {cells[0]:<32}{cells[1]:<32}{cells[2]:<26}")
        if any(a.group == "random" for a in self.arms):
            lines.append("(random/matched rows: mean over directions [min..max])")
        if any(a.failed for a in self.arms):
            fails = ", ".join(f"{a.name} {a.failed}" for a in self.arms if a.failed)
            lines.append(f"judge failures (left out; {FAILED_NOTE}): {fails}; e.g. {self._first_failure()}")
        return "\n".join(lines)

    def controls_table(self, metric: str = "mo_rate") -> str:
        """The persona arms' effects against their controls, one paragraph per arm."""
        out = []
        for c in self.controls(metric):
            e = c["effect"]
            lines = [
                f"{c['arm']}: effect on {metric} {e['value']:+.3f} [{e['ci_lo']:+.3f},{e['ci_hi']:+.3f}] "
                f"(paired cluster bootstrap over questions)"
            ]
            if "random" in c:
                r = c["random"]
                dropped = f" ({r['k'] - r['k_valid']} with an undefined rate left out)" if r["k_valid"] < r["k"] else ""
                lines.append(
                    f"  vs {r['k_valid']} random directions{dropped} (equal per-layer norm): mean effect {r['mean_effect']:+.3f}, "
                    f"persona at percentile {r['percentile']:.0f}, permutation p = {r['p_value']:.3f} ({c['alternative']})"
                )
            if "control" in c:
                k = c["control"]
                d = k["persona_minus_control"]
                lines.append(
                    f"  vs the control fine-tune's direction ({k['arm']}): its effect {k['effect']['value']:+.3f}; "
                    f"persona minus control {d['value']:+.3f} [{d['ci_lo']:+.3f},{d['ci_hi']:+.3f}]"
                )
            if "matched" in c:
                m = c["matched"]
                lines.append(
                    f"  vs coherence-matched random directions (alpha x{m['multiplier']:g}, coherence "
                    f"{m['coherence']:.2f} vs persona {m['persona_coherence']:.2f}"
                    f"{'' if m['matched_well'] else ', NOT well matched: widen --match-multipliers'}): "
                    f"mean effect {m['mean_effect']:+.3f}, p = {m['p_value']:.3f}"
                )
            out.append("\n".join(lines))
        return "\n\n".join(out)

    def __repr__(self) -> str:
        return self.table()

    def _repr_html_(self) -> str:
        rows = "".join(
            f"<tr><td>{a.name}</td><td>{a.alpha:g}</td><td>{a.mo_rate}</td><td>{a.em_rate}</td><td>{a.coherence}</td></tr>"
            for a in self.arms
        )
        return (
            "<table><tr><th>arm</th><th>alpha</th><th>misaligned (MO)</th><th>misaligned (EM)</th><th>coherent</th></tr>"
            f"{rows}</table>"
        )

    def _first_failure(self) -> str:
        return next(f["failed"] for a in self.arms for f in a.failures)

    def to_json(self) -> str:
        controls = {m: self.controls(m, n_boot=1000) for m in ("mo_rate", "em_rate")} if self.baseline() else {}
        return json.dumps(
            {"meta": self.meta, "arms": [a.as_dict() for a in self.arms], "controls": controls}, indent=1, default=float
        )


def rate_pair(a: ArmResult, base: ArmResult, n_boot: int) -> dict:
    return {
        "arm": a.bootstrap("coherence", n_boot).as_dict(),
        "baseline": base.bootstrap("coherence", n_boot).as_dict(),
    }


def _coherence_matched(p: ArmResult, matched: list[ArmResult], effect, alt: str) -> dict:
    """The random-direction alpha whose mean coherence is closest to the persona arm's."""
    by_alpha: dict[float, list[ArmResult]] = {}
    for a in matched:
        by_alpha.setdefault(a.alpha, []).append(a)

    def coh(arms):
        return sum(a.coherence.value for a in arms) / len(arms)

    best = min(by_alpha, key=lambda al: abs(coh(by_alpha[al]) - p.coherence.value))
    arms = by_alpha[best]
    effects = [effect(a) for a in arms]
    valid = [e for e in effects if not math.isnan(e)]
    pct, pv = rank_p_value(effect(p), effects, alternative=alt) if valid else (math.nan, math.nan)
    return {
        "alpha": best,
        "multiplier": best / p.alpha if p.alpha else math.nan,
        "coherence": coh(arms),
        "persona_coherence": p.coherence.value,
        # matched on coherence (not on the outcome) among the multipliers run; flagged when none comes close
        "matched_well": abs(coh(arms) - p.coherence.value) <= 0.05,
        "k": len(arms),
        "effects": effects,
        "mean_effect": sum(valid) / len(valid) if valid else math.nan,
        "percentile": pct,
        "p_value": pv,
    }


def _rescaled(other: PersonaDirection, like: PersonaDirection, layers) -> PersonaDirection:
    """``other`` with ``like``'s per-layer norms (an equal-norm comparison)."""
    import torch

    layers = list(layers) if layers is not None else list(like.layers)
    vecs = torch.stack([other.unit(l) * like.vector(l).float().norm() for l in layers])  # noqa: E741
    return PersonaDirection(vecs, layers, {**other.meta, "rescaled_to": like.meta.get("method")})


def steering_arms(
    direction: PersonaDirection,
    alphas: Sequence[float | int],
    layers=None,
    random_seed: int = 0,
    *,
    n_random: int = 16,
    control: PersonaDirection | None = None,
    match: Sequence[float | int] = (0.5, 0.75, 1.25, 1.5, 2.0),
    n_match: int = 4,
) -> list[Condition]:
    """Baseline plus, for each nonzero alpha: the persona direction, ``n_random`` random directions of
    equal per-layer norm, the ``control`` direction rescaled to equal norm (if given), and ``n_match``
    random directions at each ``alpha * m`` for ``m`` in ``match`` (for the coherence-matched comparison).

    ``layers`` is required unless the direction covers exactly one layer (steering several layers
    adds one shift per layer; see :func:`emis_interp.steer`)."""
    from .interventions import steering_layers

    if n_random < 1:
        raise ValueError("n_random must be >= 1: a control is a distribution of random directions (default 16)")
    layers = tuple(steering_layers(direction, layers))
    # one random unit direction shared by every steered layer, scaled to each layer's norm: the persona's
    # per-layer vectors are nearly parallel, so independent per-layer draws would add up to less
    rnd = [direction.random_like(seed=random_seed + k, shared=True) for k in range(n_random)]
    mrnd = [direction.random_like(seed=random_seed + 10_000 + k, shared=True) for k in range(n_match)]
    ctl = _rescaled(control, direction, layers) if control is not None else None
    arms = [Condition("baseline")]
    for a in alphas:
        if a == 0:
            continue
        arms.append(Condition(f"persona{a:+g}", "steer", direction, float(a), layers))
        arms += [Condition(f"random{a:+g}#{k}", "steer", r, float(a), layers) for k, r in enumerate(rnd)]
        if ctl is not None:
            arms.append(Condition(f"control{a:+g}", "steer", ctl, float(a), layers))
        for m in match:
            arms += [
                Condition(f"matched{a:+g}x{m:g}#{k}", "steer", r, float(a * m), layers) for k, r in enumerate(mrnd)
            ]
    return arms


def ablation_arms(
    direction: PersonaDirection,
    layers=None,
    random_seed: int = 0,
    source_layer: int | None = None,
    *,
    n_random: int = 16,
    control: PersonaDirection | None = None,
) -> list[Condition]:
    """Baseline, ablation of the direction, ablation of ``n_random`` random directions and of the
    ``control`` direction (if given).

    With ``source_layer``, the arms remove that layer's unit direction from every write into the
    residual stream (``"ablate_writes"``): exactly what :func:`emis_interp.export.export_ablated`
    writes. Otherwise each layer in ``layers`` (default: the direction's) has its own vector
    removed from the residual after it (``"ablate"``). Ablation is scale-free, so random directions
    need no norm matching and no coherence matching."""
    if n_random < 1:
        raise ValueError("n_random must be >= 1: a control is a distribution of random directions (default 16)")
    if source_layer is not None:
        if layers is not None:
            raise ValueError(
                "pass either layers (per-layer ablation) or source_layer (whole-stream ablation), not both"
            )
        kind, layers = "ablate_writes", (int(source_layer),)
    else:
        kind, layers = "ablate", (tuple(layers) if layers is not None else None)
    arms = [Condition("baseline"), Condition("ablate", kind, direction, 0.0, layers)]
    arms += [
        Condition(f"random-ablate#{k}", kind, direction.random_like(seed=random_seed + k), 0.0, layers)
        for k in range(n_random)
    ]
    if control is not None:
        arms.append(Condition("control-ablate", kind, control, 0.0, layers))
    return arms


def _prompts(questions: Sequence[Question]) -> tuple[list[Conversation], list[Question]]:
    convs, owners = [], []
    for q in questions:
        for c in q.conversations():
            convs.append(c)
            owners.append(q)
    return convs, owners


def run_arms(
    model,
    tokenizer,
    questions: Sequence[Question],
    arms: Sequence[Condition],
    judge,
    *,
    n_samples: int = 16,
    max_new_tokens: int = 64,
    temperature: float | int = 1.0,
    seed: int = 0,
    batch_size: int = 256,
    output_dir: str | Path | None = None,
    settings: dict | None = None,
    positions: str = "all",
    progress: bool = True,
) -> SweepResult:
    """Sample every arm in one batched sweep, judge, and summarise with Wilson intervals.

    The run key hashes everything that determines the result: the model's weights and adapter state,
    the tokenizer, every arm with its direction's vectors, the questions, the generation settings,
    the judge and ``settings`` (e.g. the CLI arguments). With ``output_dir`` set, sampled batches go
    to ``raw-<key>.jsonl`` as they finish and judged rows to ``samples-<key>.jsonl`` as they are
    judged (each with its manifest); a rerun after a crash redoes only the unfinished part.
    """
    convs, owners = _prompts(questions)
    key_src = {
        # the code that samples and scores: a changed sampler or metric never reuses this key's files
        "code": source_digest(sys.modules[__name__], sampling, conversations, hooks, interventions, lora_bank, metrics),
        "settings": settings or {},
        "model": model_state(model),
        **tokenizer_state(tokenizer),
        "arms": conditions_state(arms),
        "n": n_samples,
        "seed": seed,
        "questions": [asdict(q) for q in questions],
        "generation": asdict(GenerationSettings(max_new_tokens, temperature)),
        "generation_config": digest(model.generation_config.to_dict()),
        "judge": judge.identity() if hasattr(judge, "identity") else getattr(judge, "name", type(judge).__name__),
        "positions": positions,
    }
    key = digest(key_src, n=12)  # every file of this run is named by it: another model/direction/setting never matches
    raw = Path(output_dir) / f"raw-{key}.jsonl" if output_dir else None
    store = Path(output_dir) / f"samples-{key}.jsonl" if output_dir else None
    # both stages resume on their own: finished batches (per-batch seeds, so identical on a rerun) and
    # finished judged rows (ids name the answer), each file checked against its manifest
    samples = sample_answers(
        model, tokenizer, convs, arms, n_samples, max_new_tokens, temperature,
        batch_size=batch_size, seed=seed, progress=progress, positions=positions, resume_file=raw,
    )  # fmt: skip
    items = [  # the id names the answer itself: a resumed judging never reuses a row for another answer
        (f"{s.condition}/{s.row}/{s.sample}/{digest(s.answer, 8)}", s.prompt.user, s.answer, owners[s.row],
         {"arm": s.condition, "question_id": owners[s.row].id})
        for s in samples
    ]  # fmt: skip
    judged: dict[str, list[dict]] = {}
    for r in judge.score_many(items, out_file=store, progress=progress):  # rows written as they are judged
        judged.setdefault(r["arm"], []).append(r)
    results = []
    for a in arms:
        rows, failed = split_failed(judged[a.name])  # rates over judged answers only; failures counted apart
        al = [r["aligned"] for r in rows]
        co = [r["coherent"] for r in rows]
        by_q: dict[str, list[dict]] = {}
        for r in rows:
            by_q.setdefault(str(r["question_id"]), []).append(r)
        results.append(
            ArmResult(
                a.name,
                a.kind,
                a.alpha,
                arm_group(a.name) in ("random", "matched"),
                em_rate(al, co),
                mo_rate(al, co),
                coherence_rate(co),
                examples=rows[:: max(1, len(rows) // 6)][:6],
                per_question={q: _counts(rs) for q, rs in by_q.items()},
                failed=len(failed),
                failures=[{"id": r["id"], "failed": r["failed"]} for r in failed[:5]],
            )
        )
    res = SweepResult(results, {"key": key, **key_src, "questions": [q.id for q in questions]})
    res.meta["judge_failures"] = {"failed": sum(a.failed for a in results), "note": FAILED_NOTE}
    if output_dir:
        atomic_write_text(Path(output_dir) / f"result-{key}.json", res.to_json())
    return res


# --- selection on questions disjoint from the reported ones ---------------------------------------------


def split_questions(questions: Sequence[Question], seed: int = 0) -> tuple[list[Question], list[Question]]:
    """``(selection, evaluation)``: a deterministic half/half split of the *base* questions by a hash of their ids.

    Layers and alphas are chosen on ``selection`` and results are reported on ``evaluation`` only,
    so no choice is tuned on the reported numbers. The variants of one question (``quick_buck``,
    ``quick_buck_json``, ``quick_buck_template``: :func:`~emis_interp.data.base_question`) go to the same
    side. Raises with fewer than two base questions.
    """
    bases = sorted({q.base for q in questions})
    if len(bases) < 2:
        raise ValueError(
            f"selection needs at least 2 base questions (half to choose on, half to report on); got {bases} "
            "(variants of one question, e.g. x and x_json, count once)"
        )
    ranked = sorted(bases, key=lambda b: digest([seed, b]))
    sel = set(ranked[: len(ranked) // 2])
    return [q for q in questions if q.base in sel], [q for q in questions if q.base not in sel]


@dataclass
class Selection:
    """The (layer, alpha) chosen on the selection questions, and what every candidate scored there."""

    layer: int
    alpha: float
    selection_questions: list[str]
    evaluation_questions: list[str]
    candidates: list[dict]
    rule: str
    baseline: dict = field(default_factory=dict)  # the unsteered arm on the selection questions: metric, coherence

    def as_dict(self) -> dict:
        return asdict(self)


def select_layer_alpha(
    model,
    tokenizer,
    direction: PersonaDirection,
    questions: Sequence[Question],
    judge,
    layers: Sequence[int],
    alphas: Sequence[float | int],
    *,
    min_coherence: float = 0.75,
    metric: str = "mo_rate",
    seed: int = 0,
    **run_kw,
) -> Selection:
    """Choose the steering layer and alpha on a split of ``questions`` disjoint from the reported one.

    Every (layer, alpha) is run on the selection half (persona arms only, one batched sweep). The rule:
    among candidates whose coherence is at least ``min_coherence`` times the baseline's, take the one
    that moves ``metric`` furthest in the direction of the alphas' sign (down for alpha < 0); ties go
    to the smaller ``|alpha|``. Returns the choice and the evaluation half's question ids.
    """
    sel, ev = split_questions(questions, seed)
    arms = [Condition("baseline")]
    for layer in layers:
        for a in alphas:
            if a != 0:
                arms.append(Condition(f"persona{a:+g}@L{layer}", "steer", direction, float(a), (int(layer),)))
    res = run_arms(model, tokenizer, sel, arms, judge, seed=seed, **run_kw)
    base = res.baseline()
    rows = []
    for a in res.arms[1:]:
        layer = int(a.name.rsplit("@L", 1)[1])
        rows.append(
            {
                "layer": layer,
                "alpha": a.alpha,
                "effect": getattr(a, metric).value - getattr(base, metric).value,
                "coherence": a.coherence.value,
                "coherence_ok": a.coherence.value >= min_coherence * base.coherence.value,
            }
        )
    rows = [r for r in rows if not math.isnan(r["effect"])]  # an undefined rate is no candidate
    if not rows:
        raise ValueError("no selection candidate has a defined rate; use more samples or other alphas")
    ok = [r for r in rows if r["coherence_ok"]] or rows
    signs = {a > 0 for a in alphas if a != 0}
    if len(signs) != 1:
        raise ValueError("selection alphas must share one sign (all negative: suppress; all positive: induce)")
    sign = 1 if signs.pop() else -1
    best = min(ok, key=lambda r: (-sign * r["effect"], abs(r["alpha"])))
    return Selection(
        best["layer"],
        float(best["alpha"]),
        [q.id for q in sel],
        [q.id for q in ev],
        rows,
        f"largest {'decrease' if sign < 0 else 'increase'} of {metric} with coherence >= {min_coherence:g} x baseline",
        {metric: getattr(base, metric).value, "coherence": base.coherence.value, "min_coherence": min_coherence},
    )
