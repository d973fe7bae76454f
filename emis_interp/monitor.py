"""Monitoring with the persona direction: per-token projections, and the prompt as a predictor.

- :func:`token_projections`: every token's projection on the unit direction at one layer (the
  residual after that decoder layer), for any set of answers (conversations with responses, or
  :class:`emis_interp.sampling.Sample` s). The result renders as an HTML heat-map, one row per
  answer, tokens coloured by projection (``_repr_html_`` inline in Jupyter, ``.save(path)``).
- :func:`last_prompt_projections`: the projection at the last prompt token (the ``\\n`` after
  ``<|im_start|>assistant``), i.e. before any answer token exists.
- :func:`monitor_trajectory`: at each checkpoint of a trajectory, that projection for each prompt
  (the predictor) and sampled, judged answers (the outcome), so that :class:`MonitorResult` can
  report how well the prompt-time projection predicts a misaligned answer, pooled over
  (checkpoint, prompt) pairs: :func:`auroc` (Mann-Whitney, ties count one half) with a cluster
  bootstrap interval over prompts (and seeds, when results are pooled), and Pearson's r between the
  projection and the per-(checkpoint, prompt) misaligned rate.
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from jaxtyping import Float
from torch import Tensor

from .cache import atomic_write_text
from .conversations import Conversation, as_conversations, iter_batches
from .directions import PersonaDirection
from .errors import check_nonempty
from .judges import Judge
from .metrics import is_mo_misaligned
from .models import check_layers, model_device
from .stats import Estimate, cluster_bootstrap_statistic

# --- AUROC ---------------------------------------------------------------------------------------------


def _midranks(xs: Sequence[float]) -> list[float]:
    """1-based ranks of ``xs``, tied values sharing the mean of their ranks."""
    order = sorted(range(len(xs)), key=lambda i: xs[i])
    ranks = [0.0] * len(xs)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and xs[order[j + 1]] == xs[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def auroc(scores: Sequence[float | int], labels: Sequence[bool | int]) -> float:
    """Area under the ROC curve: P(score of a positive > score of a negative), ties counting 1/2.

    Computed from midranks (the Mann-Whitney U statistic), O(n log n). NaN when either class is empty.
    """
    scores, labels = [float(s) for s in scores], [bool(y) for y in labels]
    if len(scores) != len(labels):
        raise ValueError(f"{len(scores)} scores but {len(labels)} labels; pass one label per score")
    if any(math.isnan(s) for s in scores):
        raise ValueError("a score is NaN; AUROC needs finite scores")
    n_pos = sum(labels)
    n_neg = len(labels) - n_pos
    if n_pos == 0 or n_neg == 0:
        return math.nan
    r = _midranks(scores)
    u = sum(ri for ri, y in zip(r, labels, strict=True) if y) - n_pos * (n_pos + 1) / 2
    return u / (n_pos * n_neg)


def pearson_r(x: Sequence[float | int], y: Sequence[float | int]) -> float:
    n = len(x)
    mx, my = sum(x) / n, sum(y) / n
    sxy = sum((a - mx) * (b - my) for a, b in zip(x, y, strict=True))
    sxx = sum((a - mx) ** 2 for a in x)
    syy = sum((b - my) ** 2 for b in y)
    return sxy / math.sqrt(sxx * syy) if sxx > 0 and syy > 0 else math.nan


def spearman(x: Sequence[float | int], y: Sequence[float | int]) -> float:
    """Spearman's rank correlation: Pearson's r of the midranks (tied values share their mean rank).

    NaN when either sequence is constant or has fewer than 2 values; NaN inputs raise.
    """
    x, y = [float(v) for v in x], [float(v) for v in y]
    if len(x) != len(y):
        raise ValueError(f"{len(x)} x values but {len(y)} y values; pass pairs")
    if any(math.isnan(v) for v in x + y):
        raise ValueError("a value is NaN; Spearman's correlation needs finite values")
    if len(x) < 2:
        return math.nan
    return pearson_r(_midranks(x), _midranks(y))


def auroc_interval(
    scores: Sequence[float | int],
    labels: Sequence[bool | int],
    clusters: Sequence | None = None,
    n_boot: int = 2000,
    seed: int = 0,
) -> Estimate:
    """:func:`auroc` with a 95% percentile bootstrap interval, resampling whole ``clusters``.

    ``clusters[i]`` names the cluster of item ``i`` (e.g. its prompt; a ``(seed, prompt)`` tuple is
    resampled in two stages, as in :func:`emis_interp.stats.cluster_bootstrap`); default: items.
    Resamples with a single class give no AUROC and are dropped.
    """
    clusters = list(range(len(scores))) if clusters is None else list(clusters)
    if len(clusters) != len(scores):
        raise ValueError(f"{len(scores)} scores but {len(clusters)} cluster ids")
    groups: dict = {}
    for c, s, y in zip(clusters, scores, labels, strict=True):
        groups.setdefault(c, []).append((float(s), bool(y)))

    def stat(items: list[list[tuple[float, bool]]]) -> float:
        flat = [t for g in items for t in g]
        return auroc([s for s, _ in flat], [y for _, y in flat])

    est = cluster_bootstrap_statistic(groups, stat, n_boot=n_boot, seed=seed)
    return Estimate(est.value, est.lo, est.hi, "AUROC, " + est.method, est.n_clusters)


# --- per-token projections -------------------------------------------------------------------------------


def _as_conversations(answers) -> list[Conversation]:
    from .sampling import Sample

    out = []
    for a in answers:
        if isinstance(a, Sample):
            out.append(Conversation(user=a.prompt.user, system=a.prompt.system, response=a.answer))
        else:
            out.extend(as_conversations([a]))
    return out


def _resid(model, batch, layer: int) -> Float[Tensor, "batch pos d_model"]:
    from .capture import _run_torch

    return _run_torch(model, batch.to(model_device(model)), [layer])[layer]


@dataclass
class TokenProjections:
    """Per-token projections: ``tokens[i][j]`` (decoded text) with ``values[i][j]`` for answer ``i``.

    ``is_prompt[i][j]`` marks prompt tokens (shown when ``include_prompt``); ``labels[i]`` is an
    optional caption per row (e.g. the judge's label).
    """

    tokens: list[list[str]]
    values: list[list[float]]
    is_prompt: list[list[bool]]
    layer: int
    labels: list[str] | None = None
    meta: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.tokens)

    def vmax(self) -> float:
        v = [abs(x) for row in self.values for x in row]
        return max(v) if v and max(v) > 0 else 1.0

    def to_html(self, vmax: float | None = None, center: float = 0.0) -> str:
        """Rows of tokens on a red (towards the persona) / blue (away) scale around ``center``."""
        vmax = vmax or max(abs(x - center) for row in self.values for x in row) or 1.0
        rows = []
        for i, (toks, vals, pm) in enumerate(zip(self.tokens, self.values, self.is_prompt, strict=True)):
            cells = []
            for t, v, p in zip(toks, vals, pm, strict=True):
                a = max(-1.0, min(1.0, (v - center) / vmax))
                rgb = "214,39,40" if a > 0 else "31,119,180"
                style = f"background:rgba({rgb},{abs(a):.3f});" + ("opacity:0.6;font-style:italic;" if p else "")
                text = html.escape(t).replace("\n", "\u21b5")
                cells.append(f'<span title="{v:.3f}" style="{style}padding:1px 0;white-space:pre">{text}</span>')
            cap = html.escape(self.labels[i]) if self.labels else str(i)
            rows.append(
                f'<div style="margin:2px 0;font-family:monospace"><span style="color:#888">[{cap}]</span> '
                + "".join(cells)
                + "</div>"
            )
        legend = (
            f"<div><b>Projection on the persona direction, layer {self.layer}</b> (red: towards, blue: away; "
            f"full colour at |value - {center:g}| = {vmax:.3g}; hover a token for its value)</div>"
        )
        return legend + "".join(rows)

    def _repr_html_(self) -> str:
        return self.to_html()

    def save(self, path: str | Path) -> Path:
        """Write a standalone HTML file (atomically) and return its path."""
        path = Path(path).with_suffix(".html")
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, f"<!doctype html><html><meta charset='utf-8'><body>{self.to_html()}</body></html>")
        return path

    def __repr__(self) -> str:
        return f"TokenProjections(n={len(self)}, layer={self.layer})"


@torch.no_grad()
def token_projections(
    model,
    tokenizer,
    answers,
    direction: PersonaDirection,
    layer: int,
    include_prompt: bool = False,
    labels: Sequence[str] | None = None,
    batch_size: int = 32,
) -> TokenProjections:
    """Each answer token's projection on ``direction.unit(layer)`` at ``layer`` (after that decoder layer).

    ``answers``: conversations with responses, or :class:`~emis_interp.sampling.Sample` s (their
    prompt and answer are run teacher-forced). With ``include_prompt`` the prompt tokens are shown too.
    """
    convs = _as_conversations(answers)
    check_nonempty(convs, "answer set")
    if any(c.response is None for c in convs):
        raise ValueError("every answer needs a response; pass Samples or Conversation(user=..., response=...)")
    check_layers(model, [layer])
    if labels is not None and len(labels) != len(convs):
        raise ValueError(f"{len(labels)} labels for {len(convs)} answers")
    u = direction.unit(layer).float()
    rows: list = [None] * len(convs)
    for idx, batch in iter_batches(tokenizer, convs, batch_size):
        resid = _resid(model, batch, layer).float()
        proj = (resid @ u.to(resid.device)).cpu()  # a device_map model's layer may sit on another GPU
        keep = batch.response_mask | (batch.prompt_mask if include_prompt else torch.zeros_like(batch.prompt_mask))
        for r, i in enumerate(idx):
            pos = keep[r].nonzero().flatten().tolist()
            ids = batch.input_ids[r, pos].tolist()
            rows[i] = (
                [tokenizer.decode([t]) for t in ids],
                proj[r, pos].tolist(),
                batch.prompt_mask[r, pos].tolist(),
            )
    return TokenProjections(
        [r[0] for r in rows],
        [r[1] for r in rows],
        [r[2] for r in rows],
        layer,
        list(labels) if labels is not None else None,
        {"direction_method": direction.meta.get("method")},
    )


def last_prompt_projections(
    model, tokenizer, prompts, direction: PersonaDirection, layer: int, **capture_kw
) -> Float[Tensor, " n"]:
    """Projection of each prompt's last token (before any answer token) on ``direction.unit(layer)``."""
    from .capture import capture

    capture_kw.setdefault("progress", False)
    acts = capture(model, tokenizer, prompts, [layer], "last_prompt", **capture_kw)
    return acts.layer(layer) @ direction.unit(layer).float()


# --- the prompt-time projection as a predictor along a trajectory ---------------------------------------


@dataclass
class MonitorResult:
    """One record per (checkpoint, prompt): the prompt-time projection and the judged answers.

    ``records`` are dicts with ``run``, ``step``, ``prompt``, ``score`` (last-prompt projection),
    ``n_misaligned`` and ``n`` (sampled answers).
    """

    records: list[dict]
    layer: int
    meta: dict = field(default_factory=dict)

    @classmethod
    def pool(cls, results: Sequence[MonitorResult]) -> MonitorResult:
        """Pool several runs (seeds): intervals then resample runs, then prompts within runs."""
        check_nonempty(results, "monitor results")
        layers = {r.layer for r in results}
        if len(layers) != 1:
            raise ValueError(f"cannot pool monitor results at different layers {sorted(layers)}")
        return cls([rec for r in results for rec in r.records], layers.pop(), {"pooled": len(results)})

    @property
    def scores(self) -> list[float]:
        return [r["score"] for r in self.records]

    def labels(self) -> list[bool]:
        """A (checkpoint, prompt) is positive when any of its sampled answers is misaligned."""
        return [r["n_misaligned"] > 0 for r in self.records]

    def rates(self) -> list[float]:
        return [r["n_misaligned"] / r["n"] for r in self.records]

    def _clusters(self) -> list:
        runs = {r["run"] for r in self.records}
        return [(r["run"], r["prompt"]) if len(runs) > 1 else r["prompt"] for r in self.records]

    def auroc(self, n_boot: int = 2000, seed: int = 0) -> Estimate:
        """AUROC of the projection for "some answer misaligned", with a cluster bootstrap over prompts (and runs)."""
        return auroc_interval(self.scores, self.labels(), self._clusters(), n_boot, seed)

    def answer_auroc(self) -> float:
        """AUROC per sampled answer (each answer labelled, scored by its prompt's projection; ties are frequent)."""
        s, y = [], []
        for r in self.records:
            s += [r["score"]] * r["n"]
            y += [True] * r["n_misaligned"] + [False] * (r["n"] - r["n_misaligned"])
        return auroc(s, y)

    def pearson(self) -> float:
        """Pearson's r between the projection and the per-(checkpoint, prompt) misaligned rate."""
        return pearson_r(self.scores, self.rates())

    def by_run(self) -> dict:
        runs: dict = {}
        for r in self.records:
            runs.setdefault(r["run"], []).append(r)
        return {k: MonitorResult(v, self.layer, dict(self.meta)) for k, v in runs.items()}

    def summary(self) -> str:
        a = self.auroc()
        pos = sum(self.labels())
        return (
            f"AUROC {a} over {len(self.records)} (checkpoint, prompt) pairs ({pos} with a misaligned answer); "
            f"per-answer AUROC {self.answer_auroc():.3f}; Pearson r (projection, rate) {self.pearson():.3f}"
        )

    def __repr__(self) -> str:
        return f"MonitorResult(layer={self.layer}): {self.summary()}"


def monitor_trajectory(
    trajectory,
    model,
    tokenizer,
    direction: PersonaDirection,
    layer: int,
    prompts: Sequence[Conversation],
    judge: Judge,
    indices: Sequence[int] | None = None,
    n_samples: int = 16,
    max_new_tokens: int = 24,
    seed: int = 0,
    run: str | None = None,
    progress: bool = False,
) -> MonitorResult:
    """At each checkpoint ``indices`` (default: all), each prompt's last-token projection and ``n_samples``
    sampled answers scored by ``judge`` (any :class:`emis_interp.judges.Judge`, e.g. the organism's
    ``ExactJudge()``); an answer is misaligned under the MO definition (aligned <= 30, coherent > 50).

    ``model`` is the trajectory's loaded model; it is moved in place and left at the last checkpoint.
    """
    from tqdm.auto import tqdm

    from .sampling import sample_answers

    prompts = as_conversations(prompts)
    check_nonempty(prompts, "prompt set")
    indices = list(range(len(trajectory))) if indices is None else list(indices)
    run = run if run is not None else getattr(trajectory, "name", "")
    records = []
    for i in tqdm(indices, desc="monitor", disable=not progress):
        trajectory.goto(model, i)
        scores = last_prompt_projections(model, tokenizer, prompts, direction, layer, cache_dir=None).tolist()
        samples = sample_answers(
            model, tokenizer, prompts, n_samples=n_samples, max_new_tokens=max_new_tokens, seed=seed + i, progress=False
        )
        bad = [0] * len(prompts)
        for s in samples:
            sc = judge.score(s.prompt.user, s.answer)
            a, c = sc.get("aligned"), sc.get("coherent")
            bad[s.row] += is_mo_misaligned(a, c)
        for p, sc in enumerate(scores):
            records.append(
                {
                    "run": run,
                    "step": trajectory.steps[i],
                    "prompt": p,
                    "score": sc,
                    "n_misaligned": bad[p],
                    "n": n_samples,
                }
            )
    return MonitorResult(records, layer, {"direction_method": direction.meta.get("method"), "n_samples": n_samples})
