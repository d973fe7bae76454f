"""Batched sampling of answers under per-row interventions, so a whole sweep is one batch.

A :class:`Condition` is what happens to the residual stream while a row is sampled: nothing
(baseline), steering with ``alpha`` times a direction, or ablation of a direction. Rows of
different conditions share every forward pass, through one
:class:`emis_interp.interventions.Intervention` with per-row tensors: after layer ``l`` each row
``b`` gets

    h_b <- h_b - (h_b . u_b) u_b + delta_b

with ``u_b`` the unit vector for ``"ablate"`` rows (zero otherwise) and ``delta_b = alpha_b v_b``
for steering rows (``m_b u_b`` for mean-ablated rows, ``Condition.ablate_to``; zero otherwise);
``"ablate_writes"`` rows have their direction removed from
every write into the residual stream (as in an exported orthogonalised checkpoint). Steering
applies at every position (prompt and answer) unless ``positions`` restricts it to the prompt or
the answer (see :mod:`emis_interp.interventions`).

A condition may also name a LoRA ``adapter`` of a :class:`~emis_interp.lora_bank.LoraBank` passed
as ``adapters=`` (``bank=`` to :func:`rowwise`): its rows run through that adapter, so a grid of
checkpoints x steering alphas samples as one batch of the base model. ``adapter=None`` rows run
the plain model (bank row ``"__base__"``).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from tqdm.auto import tqdm

from .cache import atomic_write_text
from .conversations import Conversation, make_batch
from .directions import PersonaDirection
from .errors import ConfigError, check_alpha, check_finite, check_nonempty
from .hooks import n_active_hooks
from .manifest import ManifestMismatch
from .models import check_layers, d_model, model_device

if TYPE_CHECKING:
    from .lora_bank import LoraBank

KINDS = ("none", "steer", "ablate", "ablate_writes", "ablate_components")


@dataclass(frozen=True)
class Condition:
    """One arm of an experiment. ``kind`` is one of:

    - ``"none"``: baseline;
    - ``"steer"``: add ``alpha * direction.vector(l)`` after each layer in ``layers`` (required
      unless the direction covers exactly one layer);
    - ``"ablate"``: remove each layer's own unit vector from the residual after each of ``layers``
      (default: the direction's layers). With ``ablate_to`` (``((layer, value), ...)``, one per layer) the
      component is *set* to ``value`` instead of 0: ``h <- h - (h . u) u + value u``. Mean-ablation passes a
      reference model's mean projection per layer (e.g. :func:`emis_interp.train_interventions.base_projection`), so a
      direction whose mean projection is negative is not pushed *towards* the trait, as zero-ablation does;
    - ``"ablate_writes"``: remove ``direction.unit(l)`` for the one layer ``l`` in ``layers`` (or the
      direction's only layer) from every write into the residual stream: exactly what
      :func:`emis_interp.export.export_ablated` bakes into the weights;
    - ``"ablate_components"``: remove the direction from the writes of ``components`` only
      (``(layer, "H{h}" | "MLP")`` pairs, e.g. ``Attribution.top(k)``), each along its own layer's
      unit vector, or along ``direction.unit(l)`` with ``layers=(l,)``
      (:func:`emis_interp.interventions.ablate_components`).

    ``adapter`` names a LoRA adapter of the bank passed to :func:`sample_answers` (``adapters=``)
    or :func:`rowwise` (``bank=``): the row runs through that adapter, with the intervention on
    top. ``None`` (or ``"__base__"``, stored as None) is the plain model.
    """

    name: str
    kind: str = "none"
    direction: PersonaDirection | None = None
    alpha: float | int = 0.0
    layers: tuple[int, ...] | None = None  # default: the direction's layers
    components: tuple[tuple[int, str], ...] = ()  # for "ablate_components"
    adapter: str | None = None  # a LoraBank adapter name; None: the plain model
    ablate_to: tuple[tuple[int, float | int], ...] = ()  # for "ablate": (layer, value) the component is set to; () = 0

    def __post_init__(self):
        from .lora_bank import BASE

        if self.adapter == BASE:
            object.__setattr__(self, "adapter", None)
        if self.adapter is not None and not isinstance(self.adapter, str):
            raise ValueError(f"condition {self.name!r}: adapter must be a LoraBank adapter name, got {self.adapter!r}")
        object.__setattr__(self, "components", tuple((int(a), str(b)) for a, b in self.components))
        if (self.kind == "ablate_components") != bool(self.components):
            raise ValueError(
                f"condition {self.name!r}: components= goes with kind='ablate_components' (and it needs at least one)"
            )
        if self.kind == "ablate_components" and self.layers is not None and len(self.layers) != 1:
            raise ValueError(
                f"condition {self.name!r}: 'ablate_components' takes layers=(source_layer,) or None (each "
                "component's own layer)"
            )
        if self.kind not in KINDS:
            raise ValueError(f"Condition.kind must be one of {KINDS}, got {self.kind!r}")
        if self.kind != "none" and self.direction is None:
            raise ValueError(f"condition {self.name!r} ({self.kind}) needs a direction")
        pairs = [(int(a), float(b)) for a, b in self.ablate_to]
        if len({a for a, _ in pairs}) != len(pairs):
            raise ValueError(f"condition {self.name!r}: ablate_to names a layer twice: {self.ablate_to}")
        object.__setattr__(self, "ablate_to", tuple(sorted(pairs)))  # one order, one cache key
        if self.ablate_to:
            if self.kind != "ablate":
                raise ValueError(
                    f"condition {self.name!r}: ablate_to= goes with kind='ablate' (it sets the ablated component), "
                    f"not {self.kind!r}"
                )
            got, want = [a for a, _ in self.ablate_to], sorted(self.active_layers())
            if got != want:
                raise ValueError(
                    f"condition {self.name!r}: ablate_to names layers {got} but the condition ablates {want}; give one "
                    "(layer, value) per ablated layer, e.g. the reference model's mean projections "
                    "(emis_interp.train_interventions.base_projection)."
                )
            check_finite(torch.tensor([v for _, v in self.ablate_to]), "ablate_to")
        check_alpha(self.alpha)
        if self.kind == "steer":
            from .interventions import steering_layers

            steering_layers(self.direction, self.layers)  # raises if the layers are ambiguous
        if self.kind == "ablate_writes" and len(self.active_layers()) != 1:
            raise ValueError(
                f"condition {self.name!r}: 'ablate_writes' removes one direction from the whole stream; pass "
                f"layers=(source_layer,) (the direction covers {self.direction.layers})"
            )

    def active_layers(self) -> tuple[int, ...]:
        if self.kind == "none":
            return ()
        if self.kind == "ablate_components":
            return tuple(sorted({layer for layer, _ in self.components}))
        return tuple(self.layers) if self.layers is not None else tuple(self.direction.layers)


def check_adapters(conditions: Sequence[Condition], bank: LoraBank | None) -> None:
    """Raise if a condition names an adapter that ``bank`` (maybe None) does not hold."""
    named = sorted({c.adapter for c in conditions if c.adapter is not None})
    if named and bank is None:
        raise ConfigError(
            f"conditions name LoRA adapters {named} but no bank was given; pass adapters=LoraBank.from_checkpoints("
            "model, {name: checkpoint_dir}) (bank= for rowwise)."
        )
    if named:
        bank.index(named)  # raises naming the unknown ones


def rowwise_intervention(model, conditions: Sequence[Condition], positions="all", bank: LoraBank | None = None):
    """One :class:`~emis_interp.interventions.Intervention` applying ``conditions[b]`` to batch row ``b``
    (None when no condition does anything); ``bank`` is the :class:`~emis_interp.lora_bank.LoraBank`
    holding the conditions' adapters."""
    from .interventions import Intervention, check_positions

    check_positions(positions)
    check_adapters(conditions, bank)
    if any(c.ablate_to for c in conditions) and not (isinstance(positions, str) and positions == "all"):
        raise ValueError(
            f"positions={positions!r} gates steering, but an ablation (ablate_to=, mean-ablation) applies at every "
            "position: its added mean would be gated and its removal not. Sample mean-ablated arms with positions='all'."
        )
    n, dm = len(conditions), d_model(model)
    for c in conditions:
        if c.direction is not None and c.direction.d_model != dm:
            raise ValueError(f"condition {c.name!r}: direction d_model={c.direction.d_model} != model d_model={dm}")
        if c.kind != "none":
            check_layers(model, c.active_layers())
    add: dict[int, torch.Tensor] = {}
    project: dict[int, torch.Tensor] = {}
    writes = None
    comps: dict[tuple[int, str], torch.Tensor] = {}
    for b, c in enumerate(conditions):
        if c.kind == "ablate_components":
            from .interventions import component_units

            source = c.layers[0] if c.layers is not None else None
            for key, u in component_units(model, c.direction, c.components, source).items():
                comps.setdefault(key, torch.zeros(n, dm))[b] = u
            continue
        for layer in c.active_layers():
            if c.kind == "steer":
                add.setdefault(layer, torch.zeros(n, dm))[b] = c.alpha * c.direction.vector(layer).float()
            elif c.kind == "ablate":
                u = c.direction.unit(layer).float()
                project.setdefault(layer, torch.zeros(n, dm))[b] = u
                if c.ablate_to:  # set the removed component to the given value (mean-ablation)
                    add.setdefault(layer, torch.zeros(n, dm))[b] = dict(c.ablate_to)[layer] * u
            elif c.kind == "ablate_writes":
                writes = torch.zeros(n, dm) if writes is None else writes
                writes[b] = c.direction.unit(layer).float()
    lora = None
    if any(c.adapter is not None for c in conditions):
        lora = (bank, bank.index([c.adapter for c in conditions]))
    if not add and not project and writes is None and not comps and lora is None:
        return None
    return Intervention(
        add=add, project=project, project_writes=writes, positions=positions, project_components=comps, lora=lora
    )


@contextmanager
def rowwise(model, conditions: Sequence[Condition], positions="all", bank: LoraBank | None = None) -> Iterator[None]:
    """Apply ``conditions[b]`` to batch row ``b`` (see :class:`Condition`), all rows in one forward pass.

    ``positions`` gates steering (not ablation) as in :func:`emis_interp.steer`. Tensors are moved
    once to each layer's own device, so a ``device_map``-sharded model works. ``bank`` holds the
    LoRA adapters that conditions name (``Condition.adapter``).
    """
    iv = rowwise_intervention(model, conditions, positions, bank)
    if iv is None:
        yield
        return
    with iv.attach(model):
        yield


@dataclass
class Sample:
    """One sampled answer. ``row`` indexes the prompt list; ``condition`` names the arm."""

    prompt: Conversation
    row: int
    condition: str
    sample: int
    answer: str


@dataclass(frozen=True)
class GenerationSettings:
    """Every sampling knob, set explicitly on each ``generate`` call and recorded with every result.

    The defaults are the EM paper's (temperature 1, top_p 1, no top-k, no repetition penalty).
    Qwen's ``generation_config.json`` sets ``repetition_penalty=1.05``, ``top_k=20``, ``top_p=0.8``
    and ``temperature=0.7``: passing every knob keeps them from applying silently.
    ``temperature=0`` is greedy decoding.
    """

    max_new_tokens: int = 64
    temperature: float | int = 1.0
    top_p: float | int = 1.0
    top_k: int = 0  # 0: off
    repetition_penalty: float | int = 1.0

    def __post_init__(self):  # 1 and 1.0 are one setting (and one manifest)
        for f in ("temperature", "top_p", "repetition_penalty"):
            object.__setattr__(self, f, float(getattr(self, f)))
        object.__setattr__(self, "max_new_tokens", int(self.max_new_tokens))
        object.__setattr__(self, "top_k", int(self.top_k))

    def generate_kwargs(self) -> dict:
        kw = dict(max_new_tokens=self.max_new_tokens, repetition_penalty=float(self.repetition_penalty))
        if self.temperature > 0:
            kw.update(do_sample=True, temperature=float(self.temperature), top_p=float(self.top_p), top_k=self.top_k)
        else:
            kw.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        return kw


def conditions_state(conditions: Sequence[Condition], bank: LoraBank | None = None) -> list:
    """What the arms do, with their directions' digests (names alone do not identify an arm), and for
    an arm with an ``adapter``, the digest of that adapter's checkpoint files in ``bank``."""
    from .manifest import direction_state

    check_adapters(conditions, bank)

    def adapter(c):  # nothing for adapter-free arms: their state reads as before adapters existed
        if c.adapter is None:
            return ()
        return ({"adapter": c.adapter, "files": bank.states[c.adapter], "dtype": bank.state()["dtype"]},)

    return [
        (c.name, c.kind, float(c.alpha), list(c.active_layers()), direction_state(c.direction))
        + ((list(map(list, c.components)), None if c.layers is None else list(c.layers)) if c.components else ())
        + adapter(c)
        + ((("ablate_to", [list(x) for x in c.ablate_to]),) if c.ablate_to else ())
        for c in conditions
    ]


def sampling_manifest(
    model, tokenizer, prompts, conditions, n_samples, settings, batch_size, seed, positions, cache_impl, bank=None
):
    from . import conversations, hooks, interventions, lora_bank
    from .conversations import prompt_set_hash
    from .fingerprint import model_state
    from .manifest import Manifest, digest, source_digest, tokenizer_state

    return Manifest(
        "samples",
        {
            # the sampler, prompt formatting and intervention hooks: new code never resumes old answers
            "code": source_digest(sys.modules[__name__], conversations, hooks, interventions, lora_bank),
            "model": model_state(model),
            **tokenizer_state(tokenizer),
            "prompts": prompt_set_hash(list(prompts)),
            "conditions": conditions_state(conditions, bank),
            "n_samples": n_samples,
            "generation": asdict(settings),
            # knobs not passed explicitly come from here (min_p, no_repeat_ngram_size, suppress_tokens, ...)
            "generation_config": digest(model.generation_config.to_dict()),
            "batch_size": batch_size,
            "seed": seed,
            "positions": positions,
            "cache_implementation": cache_impl,
        },
    )


def _read_resume(path: Path, manifest, overwrite: bool) -> dict[int, list[str]]:
    """Finished batches of a resume file made under ``manifest`` (its first line); refuse another."""
    from .manifest import Manifest, check_resumable

    if not path.exists():
        return {}
    lines = path.read_text().splitlines()
    try:
        head = json.loads(lines[0]) if lines else {}
    except json.JSONDecodeError:
        head = {}
    existing = Manifest.from_json(json.dumps(head["manifest"])) if "manifest" in head else None
    if overwrite or not lines:
        path.unlink()
        return {}
    if existing is None:
        raise ManifestMismatch(
            f"{path} has no manifest header: its batches cannot be identified. Pass overwrite=True (--overwrite) "
            "to discard it, or choose another file."
        )
    check_resumable(existing, manifest, str(path))
    done: dict[int, list[str]] = {}
    for line in lines[1:]:
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # a torn last line: that batch is sampled again
        done[rec["batch"]] = rec["answers"]
    return done


def sample_answers(
    model,
    tokenizer,
    prompts: Sequence[Conversation],
    conditions: Sequence[Condition] = (Condition("baseline"),),
    n_samples: int = 1,
    max_new_tokens: int = 64,
    temperature: float | int = 1.0,
    top_p: float | int = 1.0,
    batch_size: int = 256,
    seed: int = 0,
    progress: bool = True,
    cache_implementation: str | None = None,
    positions: str = "all",
    resume_file: str | Path | None = None,
    *,
    top_k: int = 0,
    repetition_penalty: float | int = 1.0,
    overwrite: bool = False,
    adapters: LoraBank | None = None,
) -> list[Sample]:
    """Sample ``n_samples`` answers per prompt per condition, all conditions batched together.

    Rows are (condition, prompt, sample) triples, cut into batches of ``batch_size``. Sampling is
    seeded (``seed``); ``temperature=0`` is greedy. Every sampling knob is passed explicitly (see
    :class:`GenerationSettings`), so the model's ``generation_config.json`` never applies silently.
    ``cache_implementation="static"`` uses HF's static KV cache (rows keep their interventions).

    Each batch is seeded on its own (``seed``, batch index), so with ``resume_file`` set, finished
    batches are appended there as they complete and a rerun after a crash samples only the rest,
    with the same results as an uninterrupted run. The file's first line is the manifest of
    everything that determines the samples (model and adapter state, tokenizer, prompts, arms and
    their directions, generation settings, batch size, seed); a rerun under another manifest
    raises :class:`~emis_interp.manifest.ManifestMismatch` unless ``overwrite=True``.

    ``adapters`` is a :class:`~emis_interp.lora_bank.LoraBank` (built on this plain ``model``) for
    conditions that name an ``adapter``: rows of different adapters share each batch, so every
    checkpoint of a trajectory (times every steering arm) samples in one sweep. The manifest records
    each used adapter's checkpoint digest.
    """
    check_nonempty(prompts, "prompt set")
    check_nonempty(conditions, "conditions")
    check_adapters(conditions, adapters)
    settings = GenerationSettings(max_new_tokens, temperature, top_p, top_k, repetition_penalty)
    rows = [(c, i, s) for c in conditions for i in range(len(prompts)) for s in range(n_samples)]
    out: list[Sample] = []
    eos = [tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.eos_token_id]
    eos = [e for e in dict.fromkeys(eos) if e is not None and e >= 0]
    n_batches = -(-len(rows) // batch_size)
    done: dict[int, list[str]] = {}
    if resume_file is not None:
        if n_active_hooks(model):
            raise ValueError(
                "sample_answers(resume_file=...) was called inside an active steer/ablate: that intervention "
                "cannot be recorded in the resume manifest. Pass it as a Condition instead, or drop resume_file."
            )
        resume_file = Path(resume_file)
        manifest = sampling_manifest(
            model,
            tokenizer,
            prompts,
            conditions,
            n_samples,
            settings,
            batch_size,
            seed,
            positions,
            cache_implementation,
            adapters,
        )
        done = _read_resume(resume_file, manifest, overwrite)
        if not resume_file.exists():
            resume_file.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(resume_file, json.dumps({"manifest": json.loads(manifest.to_json())}) + "\n")
    for k in tqdm(range(n_batches), desc="sample", disable=not progress or n_batches < 2):
        chunk = rows[k * batch_size : (k + 1) * batch_size]
        if k in done and len(done[k]) == len(chunk):
            out += [Sample(prompts[i], i, c.name, s, t) for (c, i, s), t in zip(chunk, done[k], strict=True)]
            continue
        torch.manual_seed(seed * 1_000_003 + k)
        batch = make_batch(tokenizer, [prompts[i] for _, i, _ in chunk]).to(model_device(model))
        gen_kw = dict(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            eos_token_id=eos,
            pad_token_id=tokenizer.pad_token_id,
            **settings.generate_kwargs(),
        )
        if cache_implementation:
            gen_kw["cache_implementation"] = cache_implementation
        with torch.no_grad(), rowwise(model, [c for c, _, _ in chunk], positions, adapters):
            seqs = model.generate(**gen_kw)
        texts = tokenizer.batch_decode(seqs[:, batch.input_ids.shape[1] :], skip_special_tokens=True)
        texts = [t.strip() for t in texts]
        for (c, i, s), t in zip(chunk, texts, strict=True):
            out.append(Sample(prompts[i], i, c.name, s, t))
        if resume_file is not None:
            with open(resume_file, "a") as fh:
                fh.write(json.dumps({"batch": k, "answers": texts}) + "\n")
                fh.flush()
    return out
