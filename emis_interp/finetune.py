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
- Train-time interventions (:class:`~emis_interp.train_interventions.TrainIntervention`,
  ``finetune(cfg, intervention=...)``; the code is in :mod:`emis_interp.train_interventions`):
  CAFT-style ablation (project a direction, or the span of several, out of the residual after
  given layers) or preventative steering (add ``coef`` times a direction's raw vector) on every
  training forward pass, through the one hook engine of :mod:`emis_interp.interventions`. The
  hooks are on only inside ``trainer.train()``, so checkpoints are plain models (tested: no hooks,
  the same logits as the trained model without hooks, the same configs as an unintervened run).
  The intervention (kind, layers, coef, digests of the vectors; for mean-ablation ``ablate_to`` and the
  code that computes the reference mean) is in the manifest, and
  ``intervention.json`` records it with the base model's mean projection on each direction
  (:func:`~emis_interp.train_interventions.base_projection`): zero-ablating a direction the base
  projects *negatively* on adds along it, pushing towards the trait
  (:class:`~emis_interp.train_interventions.AblationSignWarning`).
"""

from __future__ import annotations

import json
import re
import warnings
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .cache import atomic_write_text
from .conversations import Conversation, load_jsonl, tokenize_conversation
from .errors import ConfigError, check_nonempty
from .gguf import file_sha256, is_gguf
from .manifest import (
    Manifest,
    check_resumable,
    dir_digest,
    file_digest,
    prepare_dir,
    read_manifest,
    source_digest,
    tokenizer_state,
)
from .train_interventions import BASE_PROJECTION_EXAMPLES, INTERVENTION_FILE, TrainIntervention, intervention_report

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
    (:mod:`emis_interp.conversations`), the train-time interventions (:mod:`emis_interp.train_interventions`)
    and the hook engine that applies them (:mod:`emis_interp.interventions`, :mod:`emis_interp.hooks`). The
    *loaded* code's source
    (:func:`~emis_interp.manifest.source_digest`): a file edited while this process runs the old code does
    not stamp the old code's checkpoints with the new digest."""
    import sys

    from . import conversations, hooks, interventions, train_interventions

    return source_digest(sys.modules[__name__], conversations, train_interventions, interventions, hooks)


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

    ``intervention`` (:class:`~emis_interp.train_interventions.TrainIntervention`) ablates or steers the residual stream on every
    training forward pass. It is part of the manifest, it is checked against the model before
    anything is written, and ``intervention.json`` records it with the base model's mean projection
    on each direction (:func:`~emis_interp.train_interventions.base_projection`; an
    :class:`~emis_interp.train_interventions.AblationSignWarning` when zero-ablation
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
