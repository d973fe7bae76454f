"""Screen fine-tuning data *before* training: how far does each sample push along the persona direction?

The persona-vectors recipe for data screening: for every training sample (a user prompt and the
response the model would be trained on), measure

- ``projection``: the mean over the *response tokens* of the residual stream after decoder layer
  ``layer`` of the model about to be fine-tuned, teacher-forced on the sample, dotted with the
  *unit* persona direction at that layer (``direction.unit(layer)``);
- ``own_projection``: the same for the model's *own* answer to the same prompt (its answer is
  generated, then teacher-forced as text exactly like the training response);
- ``difference = projection - own_projection``: how much further along the persona direction the
  training response sits than what the model would have said itself. A dataset whose samples
  have a large positive difference pulls the model toward the persona when it is trained on them.

Activations come from the library's one capture path (:func:`emis_interp.capture.capture`,
reduction ``"mean_response"``): layer ``l`` is the output of decoder layer ``l`` (HF
``hidden_states[l + 1]``, except that HF's final entry is taken after the final norm), padding is
masked out with position ids from the attention mask, and prompt, response and template suffix are
tokenized separately (:func:`emis_interp.conversations.tokenize_conversation`), so a response that
starts with a newline never merges with the prompt's ``assistant\\n`` (real Qwen2.5's ``"\\n\\n"``).

The model's own answers come from :func:`emis_interp.sampling.sample_answers`, **greedy by default**
(``temperature=0``; the ``seed`` then plays no part); with ``temperature > 0`` one answer per
prompt is sampled, seeded by ``seed`` (per batch, so it also depends on ``batch_size``). An own
answer that is empty (the model ended its turn at once) has no response tokens: its
``own_projection`` and ``difference`` are NaN, counted in the summary as ``n_own_empty`` and left out
of the means. Pass ``own_answers=`` to use answers generated elsewhere (e.g. by vLLM).

:func:`screen` screens one dataset into a :class:`ScreenResult` (per-sample rows, dataset-level
means with normal 95% intervals over samples, and the :class:`~emis_interp.manifest.Manifest` of
everything that produced it). :func:`screen_datasets` screens several named datasets into a
results directory (``screen_<name>.csv`` / ``.json``, ``screen_summary.csv`` and the histogram
figure), reusing a dataset's results only when its manifest matches, and refusing a directory made
under another model, tokenizer, direction, layer or generation setting unless ``overwrite=True``.

Comparing datasets: :func:`emis_interp.monitor.auroc` separates two datasets' samples by one field
(:func:`auroc_between`), and :func:`emis_interp.monitor.spearman` relates the per-dataset mean
difference to an outcome measured after fine-tuning, e.g. each fine-tune's misalignment rate
(:func:`rank_correlation`).
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
import statistics
import sys
import uuid
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from jaxtyping import Float
from torch import Tensor

from . import sampling
from .cache import atomic_write_text
from .capture import capture, capture_code
from .conversations import Conversation, as_conversations, load_jsonl, prompt_set_hash
from .directions import PersonaDirection
from .errors import ConfigError
from .fingerprint import model_state
from .hooks import cacheable
from .manifest import Manifest, ManifestMismatch, digest, direction_state, prepare_dir, source_digest, tokenizer_state
from .models import check_layers, d_model
from .monitor import auroc, spearman
from .sampling import GenerationSettings, sample_answers
from .stats import Estimate

FIELDS = ("projection", "own_projection", "difference")
CSV_COLUMNS = ("index", "prompt", "projection", "own_projection", "difference", "own_answer")
SUMMARY_COLUMNS = (
    "dataset",
    "n",
    "n_own_empty",  # own answers that were empty: no own projection, left out of the means
    "mean_projection",
    "mean_projection_lo",
    "mean_projection_hi",
    "mean_own_projection",
    "mean_own_projection_lo",
    "mean_own_projection_hi",
    "mean_difference",
    "mean_difference_lo",
    "mean_difference_hi",
)
RESULT_FORMAT = "emis_interp.ScreenResult/1"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")


# --- results ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ScreenRow:
    """One screened sample. ``index`` is its position in the dataset; ``prompt`` its user turn.

    ``own_projection`` and ``difference`` are NaN when the model's own answer was empty."""

    index: int
    prompt: str
    projection: float
    own_projection: float
    difference: float
    own_answer: str


def mean_interval(values: Sequence[float | int]) -> Estimate:
    """Mean of the finite ``values`` with a normal 95% interval, ``mean ± 1.96 sd / sqrt(n)``.

    Samples of a dataset are independent rows, so the interval is over samples. With one value
    the interval is NaN; with none the mean is NaN too (``n_clusters`` counts the values used).
    """
    xs = [float(v) for v in values if math.isfinite(v)]
    method = "normal 95% interval over samples (mean ± 1.96 SE)"
    if not xs:
        return Estimate(math.nan, math.nan, math.nan, method, 0)
    m = statistics.fmean(xs)
    if len(xs) < 2:
        return Estimate(m, math.nan, math.nan, method, 1)
    half = 1.96 * statistics.stdev(xs) / math.sqrt(len(xs))
    return Estimate(m, m - half, m + half, method, len(xs))


def _nan_to_none(x: float) -> float | None:
    return None if math.isnan(x) else x


def _none_to_nan(x: float | int | None) -> float:
    return math.nan if x is None else float(x)


@dataclass
class ScreenResult:
    """Per-sample projections of one dataset on the unit persona direction at ``layer``.

    ``manifest`` identifies everything that produced the rows (model weights and adapter state,
    tokenizer and chat template, the direction's vector at ``layer``, the data, the own answers'
    generation settings or digest); ``meta`` holds provenance for people (the model's source
    identity, the direction's own metadata, how own answers were made).
    """

    name: str
    layer: int
    rows: list[ScreenRow]
    manifest: Manifest
    meta: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.rows)

    def values(self, field: str = "difference") -> list[float]:
        """One field of every row (NaN where the own answer was empty)."""
        if field not in FIELDS:
            raise ValueError(f"unknown field {field!r}; choose one of {FIELDS}")
        return [getattr(r, field) for r in self.rows]

    def estimate(self, field: str = "difference") -> Estimate:
        """Mean of ``field`` over samples with a normal 95% interval (:func:`mean_interval`)."""
        return mean_interval(self.values(field))

    def summary(self) -> dict:
        """Dataset-level numbers: one row of ``screen_summary.csv`` (keys :data:`SUMMARY_COLUMNS`)."""
        out: dict = {
            "dataset": self.name,
            "n": len(self),
            "n_own_empty": sum(math.isnan(r.own_projection) for r in self.rows),
        }
        for f in FIELDS:
            est = self.estimate(f)
            out[f"mean_{f}"], out[f"mean_{f}_lo"], out[f"mean_{f}_hi"] = est.value, est.lo, est.hi
        return out

    def to_csv(self, path: str | Path) -> Path:
        """Write the per-sample rows (columns :data:`CSV_COLUMNS`) atomically; floats round-trip exactly."""
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(CSV_COLUMNS)
        for r in self.rows:
            w.writerow([getattr(r, c) for c in CSV_COLUMNS])
        return atomic_write_text(Path(path), buf.getvalue())

    def to_json(self) -> str:
        """Everything (manifest, meta, rows, summary) as JSON; NaN is written as null."""
        rows = [{k: _nan_to_none(v) if isinstance(v, float) else v for k, v in asdict(r).items()} for r in self.rows]
        summary = {k: _nan_to_none(v) if isinstance(v, float) else v for k, v in self.summary().items()}
        return json.dumps(
            {
                "format": RESULT_FORMAT,
                "name": self.name,
                "layer": self.layer,
                "manifest": json.loads(self.manifest.to_json()),
                "meta": self.meta,
                "summary": summary,
                "rows": rows,
            },
            indent=1,
            default=str,
        )

    @classmethod
    def from_json(cls, text: str) -> ScreenResult:
        d = json.loads(text)
        if d.get("format") != RESULT_FORMAT:
            raise ValueError(f"not a screening result (format {d.get('format')!r}, expected {RESULT_FORMAT!r})")
        rows = [
            ScreenRow(
                index=int(r["index"]),
                prompt=r["prompt"],
                projection=_none_to_nan(r["projection"]),
                own_projection=_none_to_nan(r["own_projection"]),
                difference=_none_to_nan(r["difference"]),
                own_answer=r["own_answer"],
            )
            for r in d["rows"]
        ]
        manifest = Manifest.from_json(json.dumps(d["manifest"]))
        return cls(d["name"], int(d["layer"]), rows, manifest, d.get("meta", {}))

    def __repr__(self) -> str:
        s = self.summary()
        return (
            f"ScreenResult({self.name!r}, n={len(self)}, layer={self.layer}, "
            f"projection={s['mean_projection']:.4g}, difference={s['mean_difference']:.4g})"
        )


# --- checks and identity ------------------------------------------------------------------------------


def _check_direction(model, direction: PersonaDirection, layer: int) -> int:
    """The layer, normalised; raise naming the fix if the model or the direction does not have it."""
    (layer,) = check_layers(model, [layer])
    if direction.d_model != d_model(model):
        raise ConfigError(
            f"the direction has d_model={direction.d_model} but the model has d_model={d_model(model)}: it was "
            "extracted from another model. Pass a direction extracted from this model (or one of its fine-tunes)."
        )
    if layer not in direction.layers:
        raise ConfigError(
            f"the direction has no vector for layer {layer}; it covers layers {direction.layers}. Pass one of "
            f"those (--layers), or extract a direction at layer {layer}."
        )
    return layer


def _as_dataset(dataset: Sequence[Conversation | dict] | str | Path, what: str) -> list[Conversation]:
    convs = load_jsonl(dataset) if isinstance(dataset, (str, Path)) else as_conversations(dataset)
    if not convs:
        raise ValueError(f"{what} is empty; pass at least one conversation with a user turn and a response.")
    missing = [i for i, c in enumerate(convs) if not c.response]
    if missing:
        raise ValueError(
            f"{what}: conversation(s) {missing[:10]}{' ...' if len(missing) > 10 else ''} have no assistant response "
            "(or an empty one). Screening projects the training response: pass chat rows with "
            "[system?, user, assistant] messages, and drop the rows without an answer."
        )
    return convs


def _source(model) -> dict:
    """Where the model came from, for people (:func:`emis_interp.finetune.model_identity` of its name)."""
    from .finetune import model_identity

    name = str(getattr(model.config, "_name_or_path", "") or "")
    return model_identity(name) if name else {}


def generation_state(
    settings: GenerationSettings, seed: int, batch_size: int, generation_config: dict | None = None
) -> dict:
    """What determines the model's own answers besides the model and prompts (the seed only when sampling)."""
    return {
        **asdict(settings),
        "seed": seed if settings.temperature > 0 else None,
        "batch_size": batch_size,
        "generation_config": digest(generation_config or {}),
    }


def _settings_fields(model, tokenizer, direction: PersonaDirection, layer: int, generation: dict | None) -> dict:
    """The fields every dataset of a results directory shares: model, tokenizer, direction, layer, generation."""
    ok, why = cacheable(model)
    return {
        "code": source_digest(sys.modules[__name__], sampling) + capture_code(),
        "model": model_state(model),
        # an active intervention hook cannot be fingerprinted: a fresh value per call, so never a match
        "state": "" if ok else f"{why} ({uuid.uuid4().hex})",
        **tokenizer_state(tokenizer),
        "direction": direction_state(direction.select(layer)),
        "layer": layer,
        "generation": generation,
    }


def screen_manifest(
    model,
    tokenizer,
    convs: Sequence[Conversation],
    direction: PersonaDirection,
    layer: int,
    generation: dict | None,
    own_answers: Sequence[str] | None = None,
) -> Manifest:
    """Everything that determines one dataset's screening result.

    ``generation`` (:func:`generation_state`) identifies generated own answers; for answers
    passed in, ``generation`` is None and their digest is recorded instead.
    """
    return Manifest(
        "screen",
        {
            **_settings_fields(model, tokenizer, direction, layer, generation),
            "data": prompt_set_hash(list(convs)),
            "n": len(convs),
            "own_answers": None if own_answers is None else digest(list(own_answers)),
        },
    )


# --- the computation -------------------------------------------------------------------------------------


def _dot(acts: Float[Tensor, "n d_model"], unit: Float[Tensor, " d_model"]) -> Float[Tensor, " n"]:
    return acts.float() @ unit.float()


def response_projections(
    model,
    tokenizer,
    convs: Sequence[Conversation],
    direction: PersonaDirection,
    layer: int,
    *,
    batch_size: int = 16,
    cache_dir: str | Path | None = None,
    progress: bool = True,
) -> Float[Tensor, " n"]:
    """Per conversation: the mean residual after decoder layer ``layer`` over its response tokens, dotted
    with ``direction.unit(layer)`` (fp32, CPU). The mean of the dots is the dot of the mean, so this
    is :func:`~emis_interp.capture.capture` with ``"mean_response"`` projected on the unit vector."""
    acts = capture(
        model,
        tokenizer,
        list(convs),
        [layer],
        "mean_response",
        batch_size=batch_size,
        cache_dir=cache_dir,
        progress=progress,
    )
    return _dot(acts.layer(layer), direction.unit(layer))


def own_answers_for(
    model,
    tokenizer,
    convs: Sequence[Conversation],
    *,
    max_new_tokens: int = 256,
    temperature: float | int = 0.0,
    seed: int = 0,
    batch_size: int = 16,
    progress: bool = True,
) -> list[str]:
    """The model's own answer to each conversation's prompt (system + user, no response), one per prompt,
    via :func:`~emis_interp.sampling.sample_answers`: greedy for ``temperature=0``, else seeded sampling."""
    prompts = [replace(c, response=None) for c in convs]
    samples = sample_answers(
        model,
        tokenizer,
        prompts,
        n_samples=1,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        batch_size=batch_size,
        seed=seed,
        progress=progress,
    )
    answers = [""] * len(prompts)
    for s in samples:
        answers[s.row] = s.answer
    return answers


def screen(
    model,
    tokenizer,
    dataset: Sequence[Conversation | dict] | str | Path,
    direction: PersonaDirection,
    layer: int,
    *,
    own_answers: Sequence[str] | None = None,
    max_new_tokens: int = 256,
    temperature: float | int = 0.0,
    seed: int = 0,
    batch_size: int = 16,
    progress: bool = True,
    name: str = "dataset",
    cache_dir: str | Path | None = None,
) -> ScreenResult:
    """Screen one dataset: per sample, ``projection``, ``own_projection`` and their ``difference``.

    ``dataset``: conversations with responses (:class:`~emis_interp.conversations.Conversation`,
    ``{"messages": [...]}`` dicts) or a chat JSONL path. ``direction.unit(layer)`` is the unit
    vector projected on; ``layer`` must be one of the direction's layers. The model's own answers
    are generated greedily by default (``temperature=0``), ``max_new_tokens`` each, in batches of
    ``batch_size`` (also the capture batch size; results do not depend on it up to float rounding),
    unless ``own_answers`` (one string per sample) is given. ``cache_dir`` is passed to
    :func:`~emis_interp.capture.capture` (None: no activation cache).
    """
    convs = _as_dataset(dataset, f"dataset {name!r}")
    layer = _check_direction(model, direction, layer)
    settings = GenerationSettings(max_new_tokens, temperature)
    given, generation = own_answers is not None, None
    if own_answers is not None:
        own_answers = [str(a) for a in own_answers]
        if len(own_answers) != len(convs):
            raise ValueError(
                f"{len(own_answers)} own answers for {len(convs)} samples of {name!r}; pass one answer per sample, "
                "in the dataset's order (or own_answers=None to generate them)."
            )
        how = "given"
    else:
        generation = generation_state(settings, seed, batch_size, model.generation_config.to_dict())
        own_answers = own_answers_for(
            model,
            tokenizer,
            convs,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            seed=seed,
            batch_size=batch_size,
            progress=progress,
        )
        how = "greedy" if settings.temperature == 0 else f"sampled (temperature {settings.temperature:g}, seed {seed})"
    manifest = screen_manifest(model, tokenizer, convs, direction, layer, generation, own_answers if given else None)

    kw = dict(batch_size=batch_size, cache_dir=cache_dir, progress=progress)
    proj = response_projections(model, tokenizer, convs, direction, layer, **kw).tolist()
    answered = [i for i, a in enumerate(own_answers) if a.strip()]
    own = [math.nan] * len(convs)
    if answered:
        own_convs = [replace(convs[i], response=own_answers[i]) for i in answered]
        for i, p in zip(
            answered, response_projections(model, tokenizer, own_convs, direction, layer, **kw).tolist(), strict=True
        ):
            own[i] = p
    if len(answered) < len(convs):
        warnings.warn(
            f"{name}: {len(convs) - len(answered)} of {len(convs)} own answers are empty (the model ended its turn "
            "at once); their own_projection and difference are NaN and left out of the means",
            stacklevel=2,
        )
    rows = [
        ScreenRow(i, c.user, float(p), float(o), float(p - o), a)
        for i, (c, p, o, a) in enumerate(zip(convs, proj, own, own_answers, strict=True))
    ]
    meta = {
        "source": _source(model),
        "direction": direction.meta,
        "own_answers": how,
        "dataset": str(dataset) if isinstance(dataset, (str, Path)) else None,
    }
    return ScreenResult(name, layer, rows, manifest, meta)


# --- several datasets, into a results directory ------------------------------------------------------------


def write_summary(results: Mapping[str, ScreenResult], path: str | Path) -> Path:
    """``screen_summary.csv``: one row per dataset (columns :data:`SUMMARY_COLUMNS`), atomically."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=SUMMARY_COLUMNS, lineterminator="\n")
    w.writeheader()
    for res in results.values():
        w.writerow(res.summary())
    return atomic_write_text(Path(path), buf.getvalue())


def _load_matching(path: Path, manifest: Manifest) -> ScreenResult | None:
    """The result stored at ``path`` if it was made under ``manifest``, else None (with a warning if it exists)."""
    if not path.exists():
        return None
    try:
        res = ScreenResult.from_json(path.read_text())
    except (ValueError, KeyError, TypeError) as e:
        warnings.warn(f"recomputing {path.name}: unreadable ({type(e).__name__}: {e})", stacklevel=3)
        return None
    if res.manifest.key != manifest.key:
        warnings.warn(
            f"recomputing {path.name}: made under other settings ({manifest.explain(res.manifest)})", stacklevel=3
        )
        return None
    return res


def screen_datasets(
    model,
    tokenizer,
    datasets: Mapping[str, Sequence[Conversation | dict] | str | Path],
    direction: PersonaDirection,
    layer: int,
    out_dir: str | Path,
    *,
    own_answers: Mapping[str, Sequence[str]] | None = None,
    max_new_tokens: int = 256,
    temperature: float | int = 0.0,
    seed: int = 0,
    batch_size: int = 16,
    overwrite: bool = False,
    progress: bool = True,
    png: bool = True,
    cache_dir: str | Path | None = None,
) -> dict[str, ScreenResult]:
    """Screen each named dataset (:func:`screen`) into ``out_dir``; returns ``{name: ScreenResult}``.

    Writes ``screen_<name>.csv`` (per-sample rows) and ``screen_<name>.json`` (rows, summary and
    manifest; written last, so it marks a finished dataset) for each dataset,
    ``screen_summary.csv`` (one row per dataset of this call), and the overlaid histograms of the
    per-sample difference ``screen_histogram.html`` (+ ``.png`` when Chromium is found and ``png``).

    Identity: ``out_dir/manifest.json`` records what every dataset shares (model weights, tokenizer,
    direction at ``layer``, layer, generation settings); a directory made under other settings raises
    :class:`~emis_interp.manifest.ManifestMismatch` naming the fields, unless ``overwrite=True``
    (which clears it). Within a matching directory a dataset is reused only when its own manifest
    (those settings plus the data, and the own answers if given) matches; otherwise it is recomputed.
    """
    from .plots import save_figure, screen_histogram  # upward, allowed: the histogram is written with the CSV

    if not datasets:
        raise ValueError("no datasets to screen; pass {name: conversations or JSONL path}.")
    bad = [n for n in datasets if not _NAME_RE.match(str(n))]
    if bad:
        raise ValueError(
            f"dataset names {bad} cannot name files; use letters, digits and _ . + - (e.g. the file stem)."
        )
    ok, why = cacheable(model)
    if not ok:
        raise ConfigError(
            f"screen_datasets writes resumable results, but {why}, which a manifest cannot record. Screen outside "
            "the intervention (or call screen() for a one-off result)."
        )
    own_answers = dict(own_answers or {})
    unknown = sorted(set(own_answers) - set(datasets))
    if unknown:
        raise ValueError(f"own_answers names datasets {unknown} that are not screened; datasets: {list(datasets)}")
    layer = _check_direction(model, direction, layer)
    settings = GenerationSettings(max_new_tokens, temperature)
    generation = generation_state(settings, seed, batch_size, model.generation_config.to_dict())
    shared = Manifest("screen_dir", _settings_fields(model, tokenizer, direction, layer, generation))
    out = prepare_dir(out_dir, shared, overwrite=overwrite)

    results: dict[str, ScreenResult] = {}
    for name, data in datasets.items():
        convs = _as_dataset(data, f"dataset {name!r}")
        given = own_answers.get(name)
        manifest = screen_manifest(
            model, tokenizer, convs, direction, layer, None if given is not None else generation, given
        )
        stored = _load_matching(out / f"screen_{name}.json", manifest)
        if stored is not None:
            results[name] = stored
            continue
        res = screen(
            model,
            tokenizer,
            convs,
            direction,
            layer,
            own_answers=given,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            seed=seed,
            batch_size=batch_size,
            progress=progress,
            name=name,
            cache_dir=cache_dir,
        )
        if res.manifest.key != manifest.key:  # the model changed under us (e.g. weights edited mid-run)
            raise ManifestMismatch(f"{name}: the screening manifest changed while screening; rerun on a fixed model")
        if isinstance(data, (str, Path)):
            res.meta["dataset"] = str(data)
        res.to_csv(out / f"screen_{name}.csv")
        atomic_write_text(out / f"screen_{name}.json", res.to_json())
        results[name] = res
    write_summary(results, out / "screen_summary.csv")
    save_figure(screen_histogram(results, "difference"), out / "screen_histogram", png=png)
    return results


# --- comparing datasets ------------------------------------------------------------------------------------


def auroc_between(positive: ScreenResult, negative: ScreenResult, field: str = "difference") -> float:
    """AUROC of ``field`` separating ``positive``'s samples from ``negative``'s (ties count one half;
    samples with a NaN value, i.e. an empty own answer, are left out). 1: every positive sample is higher."""
    pos = [v for v in positive.values(field) if math.isfinite(v)]
    neg = [v for v in negative.values(field) if math.isfinite(v)]
    return auroc(pos + neg, [True] * len(pos) + [False] * len(neg))


def rank_correlation(
    results: Mapping[str, ScreenResult], outcome: Mapping[str, float | int], field: str = "difference"
) -> float:
    """Spearman correlation, over datasets, of the mean ``field`` with ``outcome[name]`` (e.g. the
    misalignment rate after fine-tuning on that dataset). Datasets missing from ``outcome`` raise."""
    missing = sorted(set(results) - set(outcome))
    if missing:
        raise ValueError(f"no outcome for datasets {missing}; pass one value per screened dataset")
    names = list(results)
    return spearman([results[n].estimate(field).value for n in names], [float(outcome[n]) for n in names])


def summary_table(results: Mapping[str, ScreenResult]) -> str:
    """A plain-text table of each dataset's means and 95% intervals, highest mean difference first."""

    def num(x: float) -> str:
        return "n/a" if math.isnan(x) else f"{x:+.3f}"

    def cell(est: Estimate) -> str:
        return f"{num(est.value)} [{num(est.lo)},{num(est.hi)}]"

    width = max(len("dataset"), *(len(n) for n in results))
    head = f"{'dataset':<{width}}  {'n':>5}  {'projection [95% CI]':<26}{'own answer [95% CI]':<26}{'difference [95% CI]':<26}"
    lines = [head, "-" * len(head)]

    def rank(name: str) -> tuple[bool, float]:  # highest mean difference first, undefined (NaN) last
        v = results[name].estimate("difference").value
        return (math.isnan(v), 0.0 if math.isnan(v) else -v)

    for name in sorted(results, key=rank):
        r = results[name]
        empty = sum(math.isnan(v) for v in r.values("own_projection"))
        note = f"  ({empty} empty own answers)" if empty else ""
        lines.append(
            f"{name:<{width}}  {len(r):>5}  {cell(r.estimate('projection')):<26}"
            f"{cell(r.estimate('own_projection')):<26}{cell(r.estimate('difference')):<26}{note}".rstrip()
        )
    return "\n".join(lines)
