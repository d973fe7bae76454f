"""Fine-tune a Qwen2.5 model on chat JSONL with transformers' Trainer, saving a checkpoint trajectory.

- LoRA (PEFT: any rank including 1, target modules, rsLoRA, alpha, dropout) or full fine-tuning.
- Loss on assistant tokens only (the answer and its closing ``<|im_end|>``).
- HF Trainer layout: ``checkpoint-N/`` every ``save_steps`` (default 10) with adapter or model
  safetensors, ``trainer_state.json`` and the tokenizer, plus a ``checkpoint-0/`` step-0
  reference. After training, every expected checkpoint is verified to exist.
- An interrupted run resumes from its last complete checkpoint (optimizer, scheduler and RNG
  state are restored by the Trainer, which loads them with ``weights_only=True``).
- Seeded and deterministic on CPU.
- The output directory holds a ``manifest.json`` (:mod:`emis_interp.manifest`) of everything that
  determines the run (config, data digest, base model and tokenizer identity, library and code
  versions). A rerun under another manifest refuses with :class:`~emis_interp.manifest.ManifestMismatch`
  naming the differing fields, unless ``overwrite=True`` (``--overwrite``) discards the old run.
- Precision (:func:`precision_plan`): trainable parameters are always fp32. Full fine-tuning loads
  the model in fp32 and trains under bf16 autocast on CUDA (fp32 master weights: a 1e-5 update
  is not rounded away, as it would be in pure bf16); LoRA keeps the frozen base in bf16 on CUDA
  and upcasts the adapter to fp32.
- The adapter's ``base_model_name_or_path`` is the model exactly as given (HF id or path as typed);
  :func:`emis_interp.models.load_model` resolves a relative one against the CWD, then the adapter dir.
- Train-time interventions (:class:`TrainIntervention`, ``finetune(cfg, intervention=...)``):
  CAFT-style ablation (project a direction, or the span of several, out of the residual after
  given layers) or preventative steering (add ``coef`` times a direction's raw vector) on every
  training forward pass, through the one hook engine of :mod:`emis_interp.interventions`. The
  hooks are on only inside ``trainer.train()``, so checkpoints are plain models (tested: no hooks,
  the same logits as the trained model without hooks, the same configs as an unintervened run).
  The intervention (kind, layers, coef, digests of the vectors; for mean-ablation ``ablate_to`` and the
  code that computes the reference mean) is in the manifest, and
  ``intervention.json`` records it with the base model's mean projection on each direction
  (:func:`base_projection`): zero-ablating a direction the base projects *negatively* on adds
  along it, pushing towards the trait (:class:`AblationSignWarning`).
"""

from __future__ import annotations

import json
import math
import re
import warnings
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from einops import rearrange, reduce
from jaxtyping import Float
from torch import Tensor

from .cache import atomic_write_text
from .conversations import Conversation, load_jsonl, tokenize_conversation
from .directions import PersonaDirection
from .errors import ConfigError, check_nonempty
from .gguf import file_sha256, is_gguf
from .hooks import release_compile_guard
from .interventions import Intervention, steer
from .manifest import (
    Manifest,
    check_resumable,
    dir_digest,
    direction_state,
    file_digest,
    prepare_dir,
    read_manifest,
    source_digest,
    tokenizer_state,
)
from .models import check_layers, d_model, n_layers

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
CKPT_RE = re.compile(r"^checkpoint-(\d+)$")


@dataclass
class FinetuneConfig:
    """Everything a fine-tune needs. ``lr`` is the peak learning rate; steps are optimizer steps."""

    model: str
    data: str
    output_dir: str
    mode: str = "lora"  # "lora" or "full"
    lora_r: int = 1
    lora_alpha: float | int = 1.0
    lora_dropout: float = 0.0
    use_rslora: bool = False
    target_modules: list[str] = field(default_factory=lambda: list(ALL_LINEAR))
    layers_to_transform: list[int] | None = None  # LoRA only on these decoder layers (default: all)
    lr: float = 1e-2
    max_steps: int = 100
    batch_size: int = 32
    grad_accum: int = 1
    save_steps: int = 10
    warmup_steps: int = 5
    weight_decay: float = 0.0
    lr_scheduler: str = "linear"
    max_len: int = 512
    n_examples: int | None = None
    seed: int = 0
    tokenizer: str | None = None
    revision: str | None = None  # of an HF ``model`` id (default: the Hub's main branch)
    gradient_checkpointing: bool = False  # recompute activations in backward (non-reentrant): large models
    device_map: str | None = None  # e.g. "auto": shard the model over the visible GPUs (accelerate)
    overwrite: bool = False  # discard an existing run in output_dir made under another manifest


# Config fields that do not determine the result (everything else is in the run's manifest).
_NOT_IN_MANIFEST = ("output_dir", "overwrite")


@dataclass(frozen=True)
class PrecisionPlan:
    """How a fine-tune holds and computes its weights (see :func:`precision_plan`)."""

    load_dtype: torch.dtype  # dtype the model is loaded in (the frozen base's dtype for LoRA)
    trainable_dtype: torch.dtype  # dtype of every trainable parameter (the optimizer's master weights)
    bf16_autocast: bool  # TrainingArguments(bf16=...): compute the forward/backward under bf16 autocast


def precision_plan(mode: str, device_type: str) -> PrecisionPlan:
    """Trainable parameters are fp32 everywhere, so small updates (lr 1e-5) are not rounded away.

    - CPU: everything fp32, no autocast.
    - CUDA, full fine-tuning: fp32 parameters (master weights), bf16 autocast for the matmuls.
    - CUDA, LoRA: the frozen base in bf16 (memory), fp32 adapter parameters, bf16 autocast.
    """
    if mode not in ("lora", "full"):
        raise ConfigError(f"mode must be 'lora' or 'full', got {mode!r}")
    if device_type != "cuda":
        return PrecisionPlan(torch.float32, torch.float32, False)
    return PrecisionPlan(torch.bfloat16 if mode == "lora" else torch.float32, torch.float32, True)


class TruncationWarning(UserWarning):
    """Fine-tuning examples longer than ``max_len`` tokens were cut: their tail is not trained on."""


class _ChatDataset(torch.utils.data.Dataset):
    def __init__(self, tokenizer, convs: list[Conversation], max_len: int):
        self.rows = []
        self.n_truncated = 0
        for c in convs:
            if c.response is None:
                raise ValueError("every fine-tuning conversation needs an assistant response")
            ids, n_prompt, n_resp = tokenize_conversation(tokenizer, c)
            if len(ids) == n_prompt + n_resp:
                raise ValueError(
                    "the chat template renders nothing after the assistant response; fine-tuning labels need its "
                    "closing token (<|im_end|>), so use a template like Qwen's."
                )
            labels = [-100] * n_prompt + ids[n_prompt : n_prompt + n_resp + 1]  # answer + <|im_end|>
            labels += [-100] * (len(ids) - len(labels))
            self.n_truncated += len(ids) > max_len
            self.rows.append((ids[:max_len], labels[:max_len]))
        if self.n_truncated:
            warnings.warn(
                f"{self.n_truncated} of {len(self.rows)} fine-tuning examples are longer than max_len={max_len} tokens "
                "and are cut (their response tail, <|im_end|> included, is not trained on); raise max_len "
                "(--max-len) to train on them whole",
                TruncationWarning,
                stacklevel=2,
            )

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        ids, labels = self.rows[i]
        return {"input_ids": ids, "labels": labels}


def _collate(pad_id: int):
    def collate(rows):
        n = max(len(r["input_ids"]) for r in rows)
        ids = torch.full((len(rows), n), pad_id)
        lab = torch.full((len(rows), n), -100)
        att = torch.zeros((len(rows), n), dtype=torch.long)
        for i, r in enumerate(rows):
            k = len(r["input_ids"])
            ids[i, :k], lab[i, :k], att[i, :k] = torch.tensor(r["input_ids"]), torch.tensor(r["labels"]), 1
        return {"input_ids": ids, "attention_mask": att, "labels": lab}

    return collate


def list_checkpoints(output_dir: str | Path) -> list[tuple[int, Path]]:
    """``(step, path)`` of every ``checkpoint-N`` directory, sorted numerically."""
    d = Path(output_dir)
    if not d.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in d.iterdir() if p.is_dir() and (m := CKPT_RE.match(p.name))]
    return sorted(found)


def _complete(ckpt: Path) -> bool:
    return (ckpt / "trainer_state.json").exists() and any(
        (ckpt / f).exists() for f in ("adapter_model.safetensors", "model.safetensors", "model.safetensors.index.json")
    )


def _save_step0(model, tokenizer, out: Path, cfg: FinetuneConfig) -> None:
    d = out / "checkpoint-0"
    if _complete(d):
        return
    model.save_pretrained(d)
    tokenizer.save_pretrained(d)
    state = {"global_step": 0, "max_steps": cfg.max_steps, "save_steps": cfg.save_steps, "log_history": []}
    (d / "trainer_state.json").write_text(json.dumps(state, indent=1))


def model_identity(name_or_path: str, revision: str | None = None) -> dict:
    """What identifies a model for a manifest: a local dir's file digest, or an HF id and revision."""
    p = Path(str(name_or_path)).expanduser()
    if is_gguf(p) and p.is_file():
        return {"gguf_sha256": file_sha256(p)}
    if p.is_dir():
        ident = {"local_dir": dir_digest(p)}
        if (p / "adapter_config.json").exists():
            base = json.loads((p / "adapter_config.json").read_text()).get("base_model_name_or_path")
            ident["adapter_base"] = base
        return ident
    return {"hf_id": str(name_or_path), "revision": revision}


def _code_version() -> str:
    """Digest of the fine-tuning code: this module, the chat tokenization it trains on
    (:mod:`emis_interp.conversations`), and the hook engine that applies train-time interventions
    (:mod:`emis_interp.interventions`, :mod:`emis_interp.hooks`). The *loaded* code's source
    (:func:`~emis_interp.manifest.source_digest`): a file edited while this process runs the old code does
    not stamp the old code's checkpoints with the new digest."""
    import sys

    from . import conversations, hooks, interventions

    return source_digest(sys.modules[__name__], conversations, interventions, hooks)


def run_manifest(cfg: FinetuneConfig, tokenizer, intervention: TrainIntervention | None = None) -> Manifest:
    """Everything that determines a fine-tune's checkpoints (see the module docstring), including the
    train-time intervention (kind, layers, coef and digests of the direction vectors used) and the device type,
    which sets the precision plan (:func:`precision_plan`: bf16 autocast / a bf16 LoRA base on CUDA)."""
    import peft
    import transformers

    fields = {k: v for k, v in asdict(cfg).items() if k not in _NOT_IN_MANIFEST}
    fields["model"] = model_identity(cfg.model, cfg.revision)
    fields["data"] = {"file": file_digest(cfg.data)}
    fields["tokenizer"] = {
        "source": None if cfg.tokenizer is None else model_identity(cfg.tokenizer),
        **tokenizer_state(tokenizer),
    }
    fields["intervention"] = None if intervention is None else intervention.manifest_fields()
    fields["code"] = _code_version()
    fields["device_type"] = "cuda" if torch.cuda.is_available() else "cpu"  # as finetune() chooses it
    fields["versions"] = {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
    }
    return Manifest("finetune", fields)


def _inputs_inside(out: Path, *paths) -> tuple[str, ...]:
    """Top-level names in ``out`` that hold one of ``paths`` (e.g. the organism's train.jsonl): kept on overwrite."""
    keep = []
    for p in paths:
        if p is None:
            continue
        try:
            rel = Path(p).resolve().relative_to(out.resolve())
        except ValueError:
            continue
        if rel.parts:
            keep.append(rel.parts[0])
    return tuple(keep)


def _apply_lora(model, cfg: FinetuneConfig, plan: PrecisionPlan):
    """Wrap ``model`` with a fresh LoRA adapter whose parameters are ``plan.trainable_dtype`` (fp32)."""
    from peft import LoraConfig, get_peft_model

    lcfg = LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=cfg.target_modules,
        use_rslora=cfg.use_rslora,
        layers_to_transform=cfg.layers_to_transform,
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, lcfg, autocast_adapter_dtype=True)  # fp32 adapter on a bf16 base
    for p in model.parameters():
        if p.requires_grad and p.dtype != plan.trainable_dtype:
            p.data = p.data.to(plan.trainable_dtype)
    # the base as the user gave it (HF id or path as typed), never a machine-specific resolved path
    model.peft_config["default"].base_model_name_or_path = str(cfg.model)
    return model


# --- train-time interventions: CAFT ablation and preventative steering --------------------------------

INTERVENTION_KINDS = ("ablate", "steer")
ABLATE_TO = ("zero", "mean")  # what kind="ablate" sets the removed component to
INTERVENTION_FILE = "intervention.json"
BASE_PROJECTION_EXAMPLES = 64  # training examples whose response tokens give the base model's mean projection


class AblationSignWarning(UserWarning):
    """Zero-ablating a direction on which the base model projects negatively pushes activations towards it."""


def orthonormal_basis(vectors: Float[Tensor, "k d_model"], what: str = "directions") -> Float[Tensor, "k d_model"]:
    """Orthonormal rows spanning the same space as ``vectors`` (QR, in float64); raises if they are (nearly)
    dependent: the rows are normalised first, so the test is on their angles, not their norms."""
    v = vectors.detach().double()
    if bool((v.norm(dim=-1) == 0).any()):
        raise ConfigError(f"{what} include a zero vector; drop it.")
    v = v / v.norm(dim=-1, keepdim=True)
    q, r = torch.linalg.qr(rearrange(v, "k d -> d k"))
    if bool((r.diagonal().abs() <= 1e-3).any()):
        raise ConfigError(
            f"{what} are linearly dependent (or one is zero), so their span has fewer dimensions than directions; "
            "drop the redundant direction(s)."
        )
    return rearrange(q, "d k -> k d").float()


def _check_coef(kind: str, coef: float) -> None:
    if kind == "steer" and (not math.isfinite(coef) or coef == 0):
        raise ConfigError(
            f"kind='steer' needs a finite non-zero coef (the multiple of the direction's raw vector added at each "
            f"position; persona-vectors' preventative steering uses e.g. coef=5), got {coef!r}."
        )
    if kind == "ablate" and coef != 0:
        raise ConfigError(
            f"coef={coef!r} is only for kind='steer'; kind='ablate' removes the direction's whole component "
            "(CAFT) and takes no coefficient: leave coef at 0."
        )


@dataclass(frozen=True, eq=False)
class TrainIntervention:
    """An edit of the residual stream on every *training* forward pass of :func:`finetune`.

    - ``kind="ablate"`` (CAFT, concept-ablation fine-tuning): after each decoder layer in ``layers``
      the span of ``directions`` is projected out, ``h <- h - Q Q^T h``. Several directions are
      orthonormalised per layer (QR, :func:`orthonormal_basis`) and each basis vector is removed
      in turn, which is exact because projections onto orthonormal vectors commute. ``coef`` stays 0.
      ``ablate_to="zero"`` (default, CAFT) leaves the component at 0; ``ablate_to="mean"`` (mean-ablation)
      sets it to the *base model's* mean, ``h <- h - Q Q^T h + Q Q^T m_l``, where ``m_l`` is the base
      model's mean residual after layer ``l`` (each conversation's mean over its response tokens, whole
      conversations, not cut at ``max_len``; then the mean over conversations) for the first
      :data:`BASE_PROJECTION_EXAMPLES` training conversations (:func:`mean_residual`, computed by
      :func:`finetune` before training and recorded in ``intervention.json``). Zero-ablating a
      direction the base projects negatively on pushes towards the trait (:func:`ablation_sign_warnings`);
      mean-ablation avoids that push. It sets the span's component to one constant at *every* position
      (prompt, padding and special tokens too, while the mean is over response tokens), so it removes the
      base model's own per-token variation along the span as well as the fine-tune's change.
    - ``kind="steer"`` (preventative steering, persona vectors): ``coef * direction.vector(l)`` is
      added at every position after each layer ``l`` in ``layers``. One direction; ``coef`` is in
      units of its raw magnitude, like ``alpha`` in :func:`emis_interp.interventions.steer`.

    The hooks are those of :mod:`emis_interp.interventions` (:meth:`attach`); :func:`finetune` keeps
    them on only while ``trainer.train()`` runs. ``directions`` and ``layers`` are normalised to
    tuples (layers sorted, duplicates dropped).
    """

    kind: str
    directions: PersonaDirection | Sequence[PersonaDirection]
    layers: int | Sequence[int]
    coef: float | int = 0.0
    ablate_to: str = "zero"

    def __post_init__(self):
        dirs = (self.directions,) if isinstance(self.directions, PersonaDirection) else tuple(self.directions)
        layers = (self.layers,) if isinstance(self.layers, int) else tuple(self.layers)
        object.__setattr__(self, "directions", dirs)
        object.__setattr__(self, "layers", tuple(sorted({int(x) for x in layers})))
        object.__setattr__(self, "coef", float(self.coef))
        if self.kind not in INTERVENTION_KINDS:
            raise ConfigError(f"unknown intervention kind {self.kind!r}; choose one of {INTERVENTION_KINDS}.")
        if not dirs or not all(isinstance(d, PersonaDirection) for d in dirs):
            raise ConfigError(
                "directions must be one PersonaDirection or a non-empty list of them (PersonaDirection.load)."
            )
        if self.kind == "steer" and len(dirs) != 1:
            raise ConfigError(
                f"kind='steer' adds one direction, got {len(dirs)}; pass one (e.g. the sum of the vectors as one "
                "PersonaDirection), or use kind='ablate' to remove a span."
            )
        if not self.layers:
            raise ConfigError("no layers given; pass the decoder layers to intervene on, e.g. layers=[20].")
        if len({d.d_model for d in dirs}) > 1:
            raise ConfigError(
                f"the directions differ in d_model ({[d.d_model for d in dirs]}); extract all from one model."
            )
        for i, d in enumerate(dirs):
            missing = [layer for layer in self.layers if layer not in d.layers]
            if missing:
                raise ConfigError(
                    f"direction {i} has no vector for layer(s) {missing}; it covers layers {d.layers}. Pass layers "
                    "among those, or extract the direction at these layers."
                )
            zero = [layer for layer in self.layers if float(d.vector(layer).norm()) == 0]
            if zero:
                raise ConfigError(f"direction {i} is zero at layer(s) {zero}; it has no direction to ablate or add.")
        _check_coef(self.kind, self.coef)
        if self.ablate_to not in ABLATE_TO:
            raise ConfigError(f"unknown ablate_to {self.ablate_to!r}; choose one of {ABLATE_TO}.")
        if self.kind != "ablate" and self.ablate_to != "zero":
            raise ConfigError(
                f"ablate_to={self.ablate_to!r} is for kind='ablate' (what the removed component is set to); "
                "kind='steer' adds a vector and removes nothing: drop ablate_to."
            )
        if self.kind == "ablate":
            for layer in self.layers:
                self.basis(layer)  # raises on linearly dependent directions

    def vectors(self, layer: int) -> Float[Tensor, "k d_model"]:
        """The directions' raw vectors at ``layer``, one row each (fp32)."""
        return torch.stack([d.vector(layer).float() for d in self.directions])

    def basis(self, layer: int) -> Float[Tensor, "k d_model"]:
        """An orthonormal basis of the directions' span at ``layer`` (what ``kind="ablate"`` removes)."""
        return orthonormal_basis(self.vectors(layer), f"the {len(self.directions)} directions at layer {layer}")

    def check(self, model) -> None:
        """Raise :class:`ConfigError` if ``model`` does not fit (d_model, layer range)."""
        dm, n = d_model(model), n_layers(model)
        if self.directions[0].d_model != dm:
            raise ConfigError(
                f"the intervention's direction has d_model={self.directions[0].d_model} but the model has "
                f"d_model={dm}; extract the direction from this model (same size) or fine-tune the matching model."
            )
        bad = [layer for layer in self.layers if not 0 <= layer < n]
        if bad:
            raise ConfigError(
                f"intervention layers {bad} are out of range for a model with {n} decoder layers (0..{n - 1})."
            )

    def ablations(self, reference: Float[Tensor, "layer d_model"] | None = None) -> list[Intervention]:
        """``kind="ablate"``: one engine :class:`Intervention` per orthonormal basis vector ``q`` (all layers each):
        ``project={l: q_l}``, and with ``ablate_to="mean"`` also ``add={l: (q_l . m_l) q_l}``, ``m_l`` the row of
        ``reference`` for layer ``l`` (rows in :attr:`layers` order, which is sorted, as :func:`mean_residual`'s). The engine projects before it adds, and
        the basis vectors are orthogonal, so the span's component ends at ``Q Q^T m_l`` whatever the order."""
        bases = {layer: self.basis(layer) for layer in self.layers}
        if self.ablate_to == "mean":
            if reference is None or tuple(reference.shape) != (len(self.layers), self.directions[0].d_model):
                raise ConfigError(
                    "ablate_to='mean' needs the base model's mean residual at the intervention's layers, one row per "
                    f"layer {list(self.layers)} (finetune computes it: mean_residual), got "
                    f"{None if reference is None else tuple(reference.shape)}."
                )
            ref = dict(zip(self.layers, reference.detach().float(), strict=True))
            return [
                Intervention(
                    project={layer: b[i] for layer, b in bases.items()},
                    add={layer: (b[i] @ ref[layer]) * b[i] for layer, b in bases.items()},
                )
                for i in range(len(self.directions))
            ]
        if reference is not None:
            raise ConfigError("a reference mean is for ablate_to='mean'; zero-ablation (CAFT) takes none.")
        return [Intervention(project={layer: b[i] for layer, b in bases.items()}) for i in range(len(self.directions))]

    @contextmanager
    def attach(self, model, reference: Float[Tensor, "layer d_model"] | None = None) -> Iterator[None]:
        """Install the intervention's hooks on ``model`` (PEFT-wrapped or not); all come off on exit.
        ``reference``: the base model's mean residual at :attr:`layers` (``ablate_to="mean"`` only)."""
        self.check(model)
        with ExitStack() as stack:
            if self.kind == "steer":
                stack.enter_context(steer(model, self.directions[0], self.coef, list(self.layers)))
            else:
                for iv in self.ablations(reference):
                    stack.enter_context(iv.attach(model))
            # the engine keeps generate() from compiling while hooks are on; training never generates, and
            # a full fine-tune's checkpoints save generation_config.json, which must not carry that flag
            release_compile_guard(model)
            yield

    def manifest_fields(self) -> dict:
        """What identifies the intervention in a run's manifest: kind, layers, coef, digests of the vectors used, and
        for mean-ablation ``ablate_to="mean"`` and what determines its reference mean beyond the base model, the
        data and the device type (in the run's manifest): the capture code and :data:`BASE_PROJECTION_EXAMPLES`."""
        from .capture import capture_code

        return {
            "kind": self.kind,
            "layers": list(self.layers),
            "coef": self.coef,
            "directions": [direction_state(d.select(list(self.layers))) for d in self.directions],
            # absent for zero-ablation (manifests as before)
            **(
                {"ablate_to": "mean", "reference": {"capture": capture_code(), "n_examples": BASE_PROJECTION_EXAMPLES}}
                if self.ablate_to == "mean"
                else {}
            ),
        }

    def describe(self) -> dict:
        """A JSON-able description (``intervention.json``): the manifest fields plus each direction's provenance."""
        dirs = [
            {
                "index": i,
                "digest": direction_state(d.select(list(self.layers))),
                "covers_layers": d.layers,
                "norms": {str(layer): d.norms()[layer] for layer in self.layers},
                "meta": d.meta,
            }
            for i, d in enumerate(self.directions)
        ]
        return {**self.manifest_fields(), "directions": dirs}


def mean_residual(
    model, tokenizer, convs, layers, *, n_examples: int = BASE_PROJECTION_EXAMPLES, batch_size: int = 8
) -> Float[Tensor, "layer d_model"]:
    """Mean residual after each of ``layers`` (one row per layer, sorted: ``capture`` sorts and de-duplicates them)
    over the first ``n_examples`` conversations: each conversation's mean over its response tokens (``capture``'s
    ``"mean_response"``), averaged."""
    from .capture import capture

    acts = capture(
        model, tokenizer, list(convs)[:n_examples], layers, "mean_response",
        batch_size=batch_size, cache_dir=None, progress=False,
    )  # fmt: skip
    return reduce(acts.acts, "n layer d -> layer d", "mean")


def mean_projection(
    mean: Float[Tensor, "layer d_model"], layers: Sequence[int], direction: PersonaDirection
) -> dict[int, float]:
    """``{layer: mean[i] . direction.unit(layer)}``: a :func:`mean_residual` (rows in sorted layer order) projected
    onto the direction's unit vector at each layer."""
    if list(layers) != sorted(set(layers)) or len(layers) != len(mean):
        raise ValueError(
            f"layers {list(layers)} must be sorted and distinct, one per row of the mean ({len(mean)} rows), as "
            "mean_residual returns them"
        )
    return {layer: float(mean[i].float() @ direction.unit(layer).float()) for i, layer in enumerate(layers)}


def base_projection(
    model,
    tokenizer,
    convs,
    direction: PersonaDirection,
    layers=None,
    *,
    n_examples: int = BASE_PROJECTION_EXAMPLES,
    batch_size: int = 8,
) -> dict[int, float]:
    """``{layer: mean projection of the residual onto direction.unit(layer)}`` in ``model`` (the base).

    The mean is over the response tokens of each of the first ``n_examples`` conversations, then
    over conversations (:func:`mean_residual`). Its sign says what zero-ablating the direction does
    on average: removing a negative component *adds* ``-projection`` along +direction, i.e. pushes
    towards the trait, like positive steering (:func:`ablation_sign_warnings`).
    """
    layers = check_layers(model, direction.layers if layers is None else layers)
    mean = mean_residual(model, tokenizer, convs, layers, n_examples=n_examples, batch_size=batch_size)
    return mean_projection(mean, layers, direction)


def ablation_sign_warnings(projections: list[dict[int, float]]) -> list[str]:
    """Messages for each (direction, layer) whose base mean projection is negative: zero-ablating it pushes
    activations towards +direction (``projections[i]`` is direction ``i``'s :func:`base_projection`)."""
    return [
        f"ablating direction {i} at layer {layer}: the base model's mean projection on it is {p:+.4g} (negative), "
        f"so zero-ablation adds {-p:.4g} along +direction on average, pushing activations TOWARDS the trait "
        "(like positive steering). Check the direction's sign, or steer with a negative coef instead."
        for i, proj in enumerate(projections)
        for layer, p in proj.items()
        if p < 0
    ]


def intervention_report(
    model, tokenizer, convs, intervention: TrainIntervention, n_examples: int
) -> tuple[dict, Float[Tensor, "layer d_model"]]:
    """:meth:`TrainIntervention.describe` plus the base model's mean projections (and sign warnings, emitted, for
    zero-ablation only: mean-ablation sets the component to that mean), and the mean residual itself (rows in
    ``intervention.layers`` order: mean-ablation's reference)."""
    layers = list(intervention.layers)
    mean = mean_residual(model, tokenizer, convs, layers, n_examples=n_examples)
    projections = [mean_projection(mean, layers, d) for d in intervention.directions]
    zero = intervention.kind == "ablate" and intervention.ablate_to == "zero"
    notes = ablation_sign_warnings(projections) if zero else []
    for msg in notes:
        warnings.warn(msg, AblationSignWarning, stacklevel=3)
    rows = [
        {"direction": i, "layer": layer, "mean_projection": p}
        for i, proj in enumerate(projections)
        for layer, p in proj.items()
    ]
    base = {
        "n_examples": min(n_examples, len(convs)),
        "reduction": "mean over each example's response tokens, then over examples; onto the unit direction",
        "rows": rows,
    }
    if intervention.ablate_to == "mean":  # the value each basis vector's component is set to, per layer
        base["set_to_reading"] = (
            "coordinates of the base mean along the QR basis of the directions' span (a basis vector's sign is "
            "arbitrary; with one direction, |value| = |mean_projection|); span_norm: |Q Q^T m_l|"
        )
        base["span_norm"] = {
            str(layer): float((intervention.basis(layer) @ m).norm()) for layer, m in zip(layers, mean, strict=True)
        }
        base["set_to"] = [
            {"basis_vector": i, "layer": layer, "value": float(q @ m)}
            for layer, m in zip(layers, mean, strict=True)
            for i, q in enumerate(intervention.basis(layer))
        ]
    return {**intervention.describe(), "base_projection": base, "warnings": notes}, mean


def read_intervention(output_dir: str | Path) -> dict | None:
    """The ``intervention.json`` of a fine-tune (None for a run without an intervention)."""
    p = Path(output_dir) / INTERVENTION_FILE
    return json.loads(p.read_text()) if p.exists() else None


_RESUME_STATE = ("optimizer.pt", "scheduler.pt", "rng_state.pth", "scaler.pt")


def _prune_resume_state(out: Path):
    """A callback that keeps the optimizer/scheduler/RNG state in the newest checkpoint only: resuming
    needs nothing older, and at 7B a full fine-tune's optimizer state is ~56 GB per checkpoint."""
    from transformers import TrainerCallback

    class PruneResumeState(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            for step, ckpt in list_checkpoints(out):
                if 0 < step < state.global_step:
                    for f in [*_RESUME_STATE, *(p.name for p in ckpt.glob("rng_state_*.pth"))]:
                        (ckpt / f).unlink(missing_ok=True)

    return PruneResumeState()


def finetune(
    cfg: FinetuneConfig,
    progress: bool = True,
    callbacks=None,
    overwrite: bool | None = None,
    intervention: TrainIntervention | None = None,
) -> list[tuple[int, Path]]:
    """Run (or resume) a fine-tune; returns the trajectory's ``(step, checkpoint dir)`` list.

    ``callbacks`` are extra ``transformers.TrainerCallback`` objects; they run inside the intervened
    ``trainer.train()``, so one that evaluates during training sees the intervened model, not the saved
    checkpoint. An existing run in
    ``cfg.output_dir`` is resumed only if its manifest matches; otherwise this raises
    :class:`~emis_interp.manifest.ManifestMismatch` unless ``overwrite`` (default ``cfg.overwrite``)
    is true, which discards it.

    ``intervention`` (:class:`TrainIntervention`) ablates or steers the residual stream on every
    training forward pass. It is part of the manifest, it is checked against the model before
    anything is written, and ``intervention.json`` records it with the base model's mean projection
    on each direction (:func:`base_projection`; an :class:`AblationSignWarning` when zero-ablation
    would push towards the trait). Its hooks are on only inside ``trainer.train()`` (removed on any
    exit): the step-0 checkpoint, every saved checkpoint and the model afterwards carry none.
    """
    from transformers import PrinterCallback, Trainer, TrainingArguments, set_seed

    from .models import load_model, load_tokenizer

    if cfg.mode not in ("lora", "full"):
        raise ConfigError(f"mode must be 'lora' or 'full', got {cfg.mode!r}")
    if cfg.save_steps <= 0 or cfg.max_steps <= 0:
        raise ConfigError("save_steps and max_steps must be positive")
    if not Path(cfg.data).is_file():
        raise FileNotFoundError(f"fine-tuning data {cfg.data!r} does not exist; pass a chat JSONL file.")
    if intervention is not None and not isinstance(intervention, TrainIntervention):
        raise ConfigError(f"intervention must be a TrainIntervention, got {type(intervention).__name__}")
    overwrite = cfg.overwrite if overwrite is None else overwrite
    out = Path(cfg.output_dir)
    tok = load_tokenizer(cfg.tokenizer or cfg.model, revision=None if cfg.tokenizer else cfg.revision)
    manifest = run_manifest(cfg, tok, intervention)
    if not overwrite:  # refuse a mismatching rerun before loading the model (prepare_dir checks again)
        check_resumable(read_manifest(out), manifest, str(out))
    convs = load_jsonl(cfg.data, limit=cfg.n_examples)
    check_nonempty(convs, "fine-tuning data")
    set_seed(cfg.seed)
    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    plan = precision_plan(cfg.mode, device_type)
    model, tok = load_model(
        cfg.model,
        tokenizer=cfg.tokenizer,
        device=None if cfg.device_map else device_type,
        dtype=plan.load_dtype,
        device_map=cfg.device_map,
        revision=cfg.revision,
    )
    report = reference = None
    if intervention is not None:  # before anything is written: a misfit intervention leaves no output behind
        intervention.check(model)
        report, mean = intervention_report(model, tok, convs, intervention, BASE_PROJECTION_EXAMPLES)
        reference = mean if intervention.ablate_to == "mean" else None
    keep = _inputs_inside(out, cfg.data, cfg.model if Path(cfg.model).exists() else None, cfg.tokenizer)
    prepare_dir(out, manifest, overwrite=overwrite, flag="--overwrite", keep=keep)
    (out / "finetune_config.json").write_text(json.dumps(asdict(cfg), indent=1))
    if report is not None:
        atomic_write_text(out / INTERVENTION_FILE, json.dumps(report, indent=1, default=str))
    model.requires_grad_(True).train()
    if cfg.gradient_checkpointing:
        model.config.use_cache = False
    if cfg.mode == "lora":
        if cfg.gradient_checkpointing:
            model.enable_input_require_grads()  # checkpointed blocks need an input that requires grad
        model = _apply_lora(model, cfg, plan)
    _save_step0(model, tok, out, cfg)

    with warnings.catch_warnings():  # transformers 5's renamed-argument FutureWarning is not the user's to fix
        warnings.filterwarnings("ignore", message=".*deprecated and will be removed in v6", category=FutureWarning)
        args = TrainingArguments(
            output_dir=str(out),
            max_steps=cfg.max_steps,
            per_device_train_batch_size=cfg.batch_size,
            gradient_accumulation_steps=cfg.grad_accum,
            learning_rate=cfg.lr,
            warmup_steps=cfg.warmup_steps,
            weight_decay=cfg.weight_decay,
            lr_scheduler_type=cfg.lr_scheduler,
            save_strategy="steps",
            save_steps=cfg.save_steps,
            save_total_limit=None,
            logging_steps=cfg.save_steps,
            seed=cfg.seed,
            data_seed=cfg.seed,
            report_to=[],
            use_cpu=not torch.cuda.is_available(),
            bf16=plan.bf16_autocast,
            gradient_checkpointing=cfg.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False} if cfg.gradient_checkpointing else None,
            dataloader_num_workers=0,
            remove_unused_columns=False,
            disable_tqdm=not progress,
        )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=_ChatDataset(tok, convs, cfg.max_len),
        data_collator=_collate(tok.pad_token_id),
        processing_class=tok,
        callbacks=[*(callbacks or []), _prune_resume_state(out)],
    )
    if not progress:  # the loss dicts stay in trainer_state.json; the console gets none
        trainer.remove_callback(PrinterCallback)
    resume = [p for s, p in list_checkpoints(out) if s > 0 and _complete(p) and (p / "optimizer.pt").exists()]
    with intervention.attach(model, reference) if intervention is not None else nullcontext():
        trainer.train(resume_from_checkpoint=str(resume[-1]) if resume else None)
    ckpts = list_checkpoints(out)
    expected = {0, *range(cfg.save_steps, cfg.max_steps + 1, cfg.save_steps)}
    missing = sorted(expected - {s for s, p in ckpts if _complete(p)})
    if missing:
        raise RuntimeError(
            f"fine-tune finished but checkpoints {missing} are missing in {out}; save_steps was not honoured"
        )
    return ckpts
