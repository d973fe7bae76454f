"""Checkpoint trajectories: discover ``checkpoint-N`` dirs, swap weights in place, track the persona.

:class:`Trajectory` finds HF Trainer ``checkpoint-N`` directories (sorted numerically), tells
LoRA from full checkpoints, and moves *one* loaded model between them without re-instantiating
it: LoRA adapter tensors are copied into the existing adapter modules, full-checkpoint tensors
into the existing parameters (both straight from safetensors).

:func:`track` runs a fixed evaluation set through every checkpoint and records, per layer,

- ``shift_norm``: ``||mean_act(step) - mean_act(0)||`` (residual units),
- ``cos_final``: the cosine of that shift with the final checkpoint's shift,
- ``proj_final``: ``(mean_act(step) - mean_act(0)) . u_final`` with ``u_final`` the unit final shift
  (the projection of the activations onto the final direction, relative to step 0),
- ``cos_direction`` / ``proj_direction`` for a given :class:`PersonaDirection`,

and per checkpoint the log-prob misalignment ``p_mis[set]`` on pivotal-token probes and the
in-task metric (mean log-prob of held-out training answers, nats/token), plus any ``extra``
metrics. Per-checkpoint results are written as they finish (``metrics.jsonl`` and
``acts/step-N.safetensors``); a rerun skips finished checkpoints.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file
from tqdm.auto import tqdm

from . import cache as _cache
from .capture import capture
from .conversations import Conversation, as_conversations, prompt_set_hash
from .data import Probe
from .directions import PersonaDirection
from .errors import ConfigError
from .finetune import CKPT_RE, list_checkpoints
from .fingerprint import library_versions, placement_state
from .manifest import Manifest, digest, dir_digest, prepare_dir, source_digest, tokenizer_state
from .models import is_hf_id, load_model


@dataclass
class Trajectory:
    """An ordered list of checkpoints of one fine-tuning run (``kind``: ``"lora"`` or ``"full"``)."""

    steps: list[int]
    paths: list[str]
    kind: str
    base: str | None = None
    tokenizer: str | None = None
    name: str = ""

    @classmethod
    def from_dir(cls, path: str | Path, base: str | None = None, base_step: bool = True) -> Trajectory:
        """Discover ``checkpoint-N`` directories under ``path``: any set of them, in step order.

        The steps need not be evenly spaced: the HF Trainer always adds a final checkpoint at ``max_steps``
        (10, 20, ..., 370 and 375), and ``save_total_limit`` prunes older ones; both are taken as they are.
        Most runs save from ``checkpoint-10`` on. Then, with ``base_step`` (default), step 0 is the
        model *before* fine-tuning: for LoRA the base model (the adapter's B matrices set to zero, exactly
        the base model's outputs), for full checkpoints the ``base`` model's weights (``base`` required).
        :attr:`step0` says which it is; ``base_step=False`` starts at the first saved checkpoint.
        """
        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(f"trajectory directory {str(path)!r} does not exist; pass the run's output_dir.")
        ckpts = list_checkpoints(path)
        if not ckpts:
            raise FileNotFoundError(
                f"no checkpoint-N directories in {str(path)!r}; run experiments/finetune.py (save_steps) first."
            )
        steps = [s for s, _ in ckpts]
        kinds = {_kind(p) for _, p in ckpts}
        if len(kinds) != 1:
            raise ConfigError(f"{path} mixes LoRA and full checkpoints ({kinds}); keep one kind per trajectory.")
        kind = kinds.pop()
        tok = next((str(p) for _, p in ckpts if _has_tok(p)), None)
        if kind == "lora" and base is None:
            base = json.loads((ckpts[0][1] / "adapter_config.json").read_text()).get("base_model_name_or_path")
        traj = cls(steps, [str(p) for _, p in ckpts], kind, base, tok, path.name)
        return traj.with_base_step() if base_step and steps[0] != 0 else traj

    def with_base_step(self) -> Trajectory:
        """This trajectory with step 0 = the model before fine-tuning (when it has no checkpoint-0)."""
        if self.steps[0] == 0:
            return self
        if self.base is None:
            raise ConfigError(
                f"trajectory {self.name!r} has no checkpoint-0 and no base model to stand for step 0: pass "
                "base=... (--base: the model the run fine-tuned), or base_step=False to start at "
                f"checkpoint-{self.steps[0]}."
            )
        return Trajectory([0, *self.steps], [BASE_STEP, *self.paths], self.kind, self.base, self.tokenizer, self.name)

    @property
    def step0(self) -> str:
        """What the first step is: ``checkpoint-0``, the base model, or a later checkpoint (no step 0)."""
        if self.paths[0] == BASE_STEP:
            what = "base model (adapter zeroed)" if self.kind == "lora" else "base model weights"
            return f"{what}: no checkpoint-0 saved"
        if self.steps[0] == 0:
            return "checkpoint-0"
        return f"checkpoint-{self.steps[0]} (no step 0: shifts are measured from it)"

    def subset(self, indices: Sequence[int]) -> Trajectory:
        """These checkpoints only (e.g. every other one), in order; index 0 (step 0) is always kept."""
        idx = sorted({0, *(int(i) for i in indices)})
        return Trajectory(
            [self.steps[i] for i in idx], [self.paths[i] for i in idx], self.kind, self.base, self.tokenizer, self.name
        )

    @classmethod
    def from_list(
        cls, models: Sequence[str], steps: Sequence[int] | None = None, base: str | None = None
    ) -> Trajectory:
        """A trajectory from local checkpoint dirs and/or Hub repos, in order.

        A Hub entry is ``owner/name`` or ``owner/name@REVISION`` (a branch, tag or commit, e.g.
        ``org/run@step-40``); it is downloaded (or found in the local HF cache) with
        ``huggingface_hub.snapshot_download`` so that checkpoints can be swapped from local files.
        Steps default to the ``checkpoint-N`` / ``step-N`` number in each entry, else its position.
        """
        if not models:
            raise ValueError("empty model list; pass at least one checkpoint")
        models = [str(m) for m in models]
        steps = list(steps) if steps is not None else [_step_of(m, i) for i, m in enumerate(models)]
        if len(steps) != len(models):
            raise ValueError(f"{len(models)} models but {len(steps)} steps")
        paths = [_local_checkpoint(m) for m in models]
        kinds = {_kind(Path(p)) for p in paths}
        if len(kinds) != 1:
            raise ConfigError(f"mixed LoRA and full checkpoints: {kinds}")
        tok = next((p for p in paths if _has_tok(Path(p))), None)
        return cls(steps, paths, kinds.pop(), base, tok, "list")

    def __len__(self) -> int:
        return len(self.steps)

    def __repr__(self) -> str:
        return f"Trajectory({self.name!r}, kind={self.kind}, steps={self.steps[0]}..{self.steps[-1]} ({len(self)} checkpoints))"

    def _repr_html_(self) -> str:
        return f"<b>Trajectory</b> {self.name} &mdash; {self.kind}, {len(self)} checkpoints: steps {self.steps}"

    # --- loading and in-place swapping -------------------------------------------------------

    def load(self, device: str | None = None, dtype=None, device_map=None):
        """Load the model once, at the first saved checkpoint. Returns ``(model, tokenizer)``.

        ``device_map`` (e.g. ``"auto"``) shards a model larger than one GPU over the node's GPUs.
        """
        first = next(p for p in self.paths if p != BASE_STEP)
        kw = dict(tokenizer=self.tokenizer, device=device, dtype=dtype, device_map=device_map)
        if self.kind == "lora":
            # the base (given, or as stored in the adapter) is resolved against the CWD, then the adapter dir
            model, tok = load_model(first, base=self.base, **kw)
        else:
            model, tok = load_model(first, **kw)
        _check_resident(model, self.kind, first)  # before any work: a swap could not write offloaded weights
        return model, tok

    def goto(self, model, index: int) -> None:
        """Put checkpoint ``index``'s weights into ``model`` in place (no re-instantiation)."""
        if self.paths[index] == BASE_STEP:
            with torch.no_grad():
                _zero_lora(model) if self.kind == "lora" else _copy_full(model, Path(_local_checkpoint(self.base)))
            return
        path = Path(self.paths[index])
        with torch.no_grad():
            if self.kind == "lora":
                _copy_lora(model, path)
            else:
                _copy_full(model, path)

    def iter(self, model, progress: bool = True) -> Iterator[tuple[int, object]]:
        """Yield ``(step, model)`` with ``model`` swapped to each checkpoint in turn."""
        for i in tqdm(range(len(self)), desc=f"checkpoints {self.name}", disable=not progress):
            self.goto(model, i)
            yield self.steps[i], model


BASE_STEP = "__base__"  # the path of step 0 when it is the model before fine-tuning


def _swapped(model, kind: str) -> list[tuple[str, torch.Tensor]]:
    """The live tensors a swap writes: the LoRA adapter's, or every parameter and buffer of a full model."""
    if kind == "lora":
        return [(n, p) for n, p in model.named_parameters() if ".lora_" in n]
    return [*model.named_parameters(), *model.named_buffers()]


def _check_resident(model, kind: str, where) -> None:
    """Refuse a model whose swapped tensors are offloaded (accelerate's CPU/disk offload leaves them on the meta
    device, holding their values in hooks): ``copy_``/``zero_`` on a meta tensor does nothing, so every step
    would silently be the first checkpoint."""
    off = [n for n, p in _swapped(model, kind) if p.device.type == "meta"]
    if off:
        raise ConfigError(
            f"{where}: {len(off)} of the {'adapter' if kind == 'lora' else 'model'} tensors a checkpoint swap writes "
            f"are offloaded to CPU/disk by the device_map (on the meta device, e.g. {off[0]}); a swap cannot write "
            "them in place. Load with a device_map that keeps every module on a device (device_map='auto' with "
            "enough GPU memory, max_memory=..., more GPUs, or dtype=torch.bfloat16), or load each checkpoint "
            "afresh with load_model(checkpoint, device_map=...)."
        )


def _verify(path, written: list[tuple[str, torch.Tensor, torch.Tensor | None]]) -> None:
    """Every written live tensor holds exactly the checkpoint's value (``None``: zero), bit for bit (NaNs included),
    compared on the live tensor's device, so a write that did not land is an error, never a silent old step."""
    from .fingerprint import tensor_bits

    for name, live, value in written:
        if live.device.type == "meta":
            ok = False
        elif value is None:
            ok = not bool(tensor_bits(live).any())
        else:
            ok = torch.equal(tensor_bits(live), tensor_bits(value.to(device=live.device, dtype=live.dtype)))
        if not ok:
            raise ConfigError(
                f"{path}: after the swap, {name} does not hold the checkpoint's values (device {live.device}); the "
                "model's weights are not where the swap writes (offloaded or wrapped). Load without offloading "
                "(see Trajectory.load) or load this checkpoint afresh with load_model."
            )


def _zero_lora(model) -> None:
    """Step 0 of a LoRA run saved without checkpoint-0: every lora_B zero, so the adapter adds exactly 0."""
    from peft import PeftModel

    if not isinstance(model, PeftModel):
        raise ConfigError("LoRA trajectory needs the model returned by Trajectory.load() (a PeftModel)")
    for cfg in model.peft_config.values():  # variants where a zero B is not the base model
        bad = [f for f in ("use_dora", "modules_to_save", "trainable_token_indices") if getattr(cfg, f, None)]
        if bad:
            raise ConfigError(
                f"step 0 stands for the base model by zeroing the adapter's B, which is not the base model with {bad}; "
                "save checkpoint-0 with the run (experiments/finetune.py does), or pass base_step=False."
            )
    _check_resident(model, "lora", "step 0 (base model)")
    written = []
    for name, p in model.named_parameters():
        if ".lora_B." in name or ".lora_embedding_B." in name:
            p.zero_()
            written.append((name, p, None))
    if not written:
        raise ConfigError("the loaded model has no lora_B parameters to zero for step 0")
    _verify("step 0 (base model)", written)


def _local_checkpoint(entry: str) -> str:
    """A local directory for a trajectory entry: an existing path as is, a Hub repo via snapshot_download."""
    p = Path(entry).expanduser()
    if p.exists():
        return str(p)
    repo_id, _, revision = entry.partition("@")
    if not is_hf_id(entry):
        raise FileNotFoundError(
            f"checkpoint {entry!r} does not exist; pass an existing checkpoint dir or a Hub repo as "
            "'owner/name' or 'owner/name@REVISION'."
        )
    from huggingface_hub import snapshot_download

    try:
        local = snapshot_download(  # weights, config and tokenizer only (no optimizer states, no other formats)
            repo_id,
            revision=revision or None,
            allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja", "merges.txt"],
        )
    except Exception as e:  # noqa: BLE001 - offline, unknown repo/revision, gated: all need the same fix
        raise ConfigError(
            f"cannot fetch Hub checkpoint {entry!r} (repo {repo_id!r}, revision {revision or 'main'!r}): "
            f"{type(e).__name__}: {e}. Download it first (huggingface-cli download {repo_id}"
            f"{' --revision ' + revision if revision else ''} --local-dir DIR) and pass DIR, or check the id/revision."
        ) from e
    return str(local)


def _kind(p: Path) -> str:
    if (p / "adapter_config.json").exists():
        return "lora"
    if (p / "config.json").exists():
        return "full"
    raise ConfigError(f"{p} holds neither adapter_config.json (LoRA) nor config.json (full model)")


def _has_tok(p: Path) -> bool:
    return (p / "tokenizer.json").exists() or (p / "tokenizer_config.json").exists()


def _step_of(name: str, i: int) -> int:
    import re

    m = CKPT_RE.match(Path(name).name) or re.search(r"step[-_]?(\d+)", name)
    return int(m.group(1)) if m else i


def _safetensors_files(path: Path, stem: str) -> list[Path]:
    single = path / f"{stem}.safetensors"
    if single.exists():
        return [single]
    index = path / f"{stem}.safetensors.index.json"
    if index.exists():
        return sorted({path / f for f in json.loads(index.read_text())["weight_map"].values()})
    raise FileNotFoundError(f"no {stem}.safetensors in {path}; is this a complete checkpoint?")


def _copy_lora(model, path: Path) -> None:
    from peft import PeftModel

    if not isinstance(model, PeftModel):
        raise ConfigError("LoRA trajectory needs the model returned by Trajectory.load() (a PeftModel)")
    _check_resident(model, "lora", path)
    sd = load_file(str(_safetensors_files(path, "adapter_model")[0]))
    params = dict(model.named_parameters())
    written = []
    for key, value in sd.items():
        # saved: base_model.model.X.lora_A.weight ; live: base_model.model.X.lora_A.default.weight
        live = key.replace(".lora_A.weight", ".lora_A.default.weight").replace(
            ".lora_B.weight", ".lora_B.default.weight"
        )
        if live not in params:
            raise ConfigError(
                f"{path}: adapter tensor {key} has no counterpart in the loaded model; ranks/targets differ."
            )
        p = params[live]
        if p.shape != value.shape:
            raise ConfigError(f"{path}: {key} has shape {tuple(value.shape)}, the loaded adapter {tuple(p.shape)}.")
        p.copy_(value.to(p.dtype))
        written.append((live, p, value))
    if not written:
        raise ConfigError(f"{path}: adapter file holds no LoRA tensors")
    done = {n for n, _, _ in written}
    stale = [n for n, _ in _swapped(model, "lora") if ".default." in n and n not in done]
    if stale:  # a live adapter tensor this checkpoint does not hold would keep the previous step's values
        raise ConfigError(
            f"{path}: the checkpoint holds no value for {len(stale)} live adapter tensor(s) (e.g. {stale[0]}): its "
            "adapter adapts other modules than the loaded one. One trajectory, one adapter layout."
        )
    _verify(path, written)


def _copy_full(model, path: Path) -> None:
    _check_resident(model, "full", path)
    params = dict(model.named_parameters())
    params.update(dict(model.named_buffers()))
    for f in _safetensors_files(path, "model"):
        written = []
        sd = load_file(str(f))
        for key, value in sd.items():
            if key not in params:
                raise ConfigError(f"{path}: tensor {key} not in the loaded model; architectures differ.")
            p = params[key]
            if p.shape != value.shape:
                raise ConfigError(
                    f"{path}: {key} has shape {tuple(value.shape)} but the loaded model has {tuple(p.shape)}; "
                    "checkpoints of one trajectory must share an architecture."
                )
            p.copy_(value.to(p.dtype))
            written.append((key, p, value))
        _verify(path, written)  # per file: a sharded checkpoint's files are not all held in memory at once


# --- tracking --------------------------------------------------------------------------------------


@dataclass
class TrackResult:
    """Per-checkpoint metrics (``checkpoints``) and per-(checkpoint, layer) persona metrics (``layers``)."""

    name: str
    checkpoints: list[dict]
    layers: list[dict]
    meta: dict = field(default_factory=dict)

    def series(self, metric: str, layer: int | None = None) -> tuple[list[int], list[float]]:
        rows = self.layers if layer is not None else self.checkpoints
        rows = [r for r in rows if layer is None or r["layer"] == layer]
        rows = [r for r in rows if metric in r]
        return [r["step"] for r in rows], [r[metric] for r in rows]

    def save(self, out_dir: str | Path) -> None:
        import csv

        out = Path(out_dir)
        _cache.atomic_write_text(out / "summary.json", json.dumps(self.__dict__, indent=1, default=float))
        for rows, fname in ((self.checkpoints, "checkpoints.csv"), (self.layers, "layers.csv")):
            if rows:
                keys = sorted({k for r in rows for k in r})
                with open(out / f".{fname}.tmp", "w", newline="") as fh:
                    w = csv.DictWriter(fh, keys)
                    w.writeheader()
                    w.writerows(rows)
                (out / f".{fname}.tmp").replace(out / fname)

    @classmethod
    def load(cls, out_dir: str | Path) -> TrackResult:
        return cls(**json.loads((Path(out_dir) / "summary.json").read_text()))

    def __repr__(self) -> str:
        return f"TrackResult({self.name!r}, {len(self.checkpoints)} checkpoints, layers={sorted({r['layer'] for r in self.layers})})"

    def _repr_html_(self) -> str:
        keys = [k for k in self.checkpoints[0] if k != "step"] if self.checkpoints else []
        head = "".join(f"<th>{k}</th>" for k in ["step", *keys])
        body = "".join(
            "<tr>"
            + "".join(
                f"<td>{r.get(k, ''):.4g}</td>" if isinstance(r.get(k), float) else f"<td>{r.get(k, '')}</td>"
                for k in ["step", *keys]
            )
            + "</tr>"
            for r in self.checkpoints
        )
        return f"<b>TrackResult</b> {self.name}<table><tr>{head}</tr>{body}</table>"


def track(
    trajectory: Trajectory,
    eval_prompts: Sequence[Conversation | str],
    layers: Sequence[int],
    out_dir: str | Path,
    *,
    probes: dict[str, list[Probe]] | None = None,
    in_task: Sequence[Conversation] | None = None,
    direction: PersonaDirection | None = None,
    reduction: str = "last_prompt",
    extra: Callable[[object, object], dict] | None = None,
    extra_key: str | None = None,
    model_and_tokenizer=None,
    progress: bool = True,
    overwrite: bool = False,
    allow_code_change: bool = False,
) -> TrackResult:
    """Track persona metrics across ``trajectory`` on a fixed evaluation set; resumable.

    ``extra(model, tokenizer) -> dict`` adds per-checkpoint metrics (e.g. a sampled harmful rate);
    ``extra_key`` names what it computes and its settings (it is part of the manifest; by default
    the function's qualified name and source).

    ``out_dir`` holds a manifest of everything that determines the per-checkpoint rows (each
    checkpoint's files, the base model, the tokenizer, prompts, layers, reduction, probes, in-task
    set, extra metrics). A rerun with the same manifest skips finished checkpoints; one with
    another raises :class:`~emis_interp.manifest.ManifestMismatch` naming the fields that differ,
    unless ``overwrite=True`` (``--overwrite``) discards the old results, or, when only the code or library
    versions differ, ``allow_code_change=True`` (``--allow-code-change``) resumes and records the override in
    ``manifest.json``.
    """
    out = Path(out_dir)
    convs = as_conversations(eval_prompts)
    layers = sorted(int(x) for x in layers)
    model, tok = model_and_tokenizer or trajectory.load()
    manifest = track_manifest(trajectory, tok, convs, layers, reduction, probes, in_task, extra, extra_key, model)
    prepare_dir(out, manifest, overwrite=overwrite, allow_code_change=allow_code_change)
    (out / "acts").mkdir(parents=True, exist_ok=True)
    done_path = out / "metrics.jsonl"
    done = {}
    if done_path.exists():
        for line in done_path.read_text().splitlines():
            try:
                r = json.loads(line)
            except json.JSONDecodeError:
                continue  # a torn last line from a crash: that checkpoint is recomputed
            if (out / "acts" / f"step-{r['step']}.safetensors").exists():
                done[r["step"]] = r
    for i in tqdm(range(len(trajectory)), desc=f"track {trajectory.name}", disable=not progress):
        step = trajectory.steps[i]
        if step in done:
            continue
        trajectory.goto(model, i)
        acts = capture(model, tok, convs, layers, reduction, cache_dir=None, progress=False)
        row: dict = {"step": step}
        if probes:
            from .metrics import probe_misalignment

            for name, ps in probes.items():
                row[f"p_mis[{name}]"] = probe_misalignment(model, tok, ps)["p_misaligned"]
        if in_task:
            from .metrics import response_logprob

            row["in_task_logprob"] = response_logprob(model, tok, in_task)
        if extra is not None:
            row.update(extra(model, tok))
        _cache.atomic_save(
            {"mean": acts.mean()}, out / "acts" / f"step-{step}.safetensors", {"layers": json.dumps(layers)}
        )
        with done_path.open("a") as fh:
            fh.write(json.dumps(row) + "\n")
        done[step] = row
    result = _summarise(trajectory, out, layers, done, direction)
    result.save(out)
    return result


def final_shift(
    trajectory: Trajectory, model, tokenizer, conversations, layers: Sequence[int], reduction: str = "mean_response"
) -> torch.Tensor:
    """``Float[Tensor, "layer d_model"]``: mean activation at the last checkpoint minus step 0 (a model-diff).

    Measure it on conversations held out from the tracking set, so that projecting the tracked shifts
    on it is not circular. Leaves ``model`` at the last checkpoint.
    """
    convs = as_conversations(conversations)
    trajectory.goto(model, 0)
    a = capture(model, tokenizer, convs, layers, reduction, cache_dir=None, progress=False).mean()
    trajectory.goto(model, len(trajectory) - 1)
    f = capture(model, tokenizer, convs, layers, reduction, cache_dir=None, progress=False).mean()
    return f - a


def checkpoint_state(path: str | Path) -> str:
    """Digest of a checkpoint's weight and config files (a local dir), or its id as given."""
    if path == BASE_STEP:
        return BASE_STEP  # the base model, whose digest is the manifest's "base"
    p = Path(path)
    return dir_digest(p) if p.is_dir() else str(path)


def track_manifest(
    trajectory, tokenizer, convs, layers, reduction, probes, in_task, extra, extra_key, model=None
) -> Manifest:
    if extra is not None and extra_key is None:
        import inspect

        if getattr(extra, "__closure__", None):
            raise ValueError(
                "track(extra=...) got a closure: the values it captures cannot be identified in the manifest, so "
                "a rerun could resume numbers made with other values. Pass extra_key='name and settings of extra'."
            )
        try:
            src = inspect.getsource(extra)
        except (OSError, TypeError):
            src = ""
        extra_key = f"{getattr(extra, '__qualname__', repr(extra))}:{digest(src)}"
    import sys

    from . import data, metrics
    from .capture import capture_code

    return Manifest(
        "track",
        {
            # the tracking, capture and probe-scoring code: new code never resumes old rows
            "code": source_digest(sys.modules[__name__], data, metrics) + capture_code(),
            "checkpoints": [(s, checkpoint_state(p)) for s, p in zip(trajectory.steps, trajectory.paths, strict=True)],
            "kind": trajectory.kind,
            "base": checkpoint_state(trajectory.base) if trajectory.base else None,
            **tokenizer_state(tokenizer),
            "prompts": prompt_set_hash(convs),
            "layers": layers,
            "reduction": reduction,
            "probes": digest(probes) if probes else None,
            "in_task": prompt_set_hash(list(in_task)) if in_task else None,
            "extra": extra_key,
            # how the checkpoints are run: dtype, devices, attention kernel (None: no model given)
            "placement": placement_state(model) if model is not None else None,
            "versions": library_versions(),
        },
    )


def _summarise(traj: Trajectory, out: Path, layers: list[int], done: dict, direction) -> TrackResult:
    means = {s: _cache.verified_load(out / "acts" / f"step-{s}.safetensors")[0]["mean"] for s in traj.steps}
    ref, final = means[traj.steps[0]], means[traj.steps[-1]]
    final_shift = final - ref
    rows = []
    for s in traj.steps:
        shift = means[s] - ref
        for j, layer in enumerate(layers):
            fs = final_shift[j]
            r = {
                "step": s,
                "layer": layer,
                "shift_norm": float(shift[j].norm()),
                "cos_final": float(torch.nn.functional.cosine_similarity(shift[j], fs, dim=0))
                if shift[j].norm() > 0
                else 0.0,
                "proj_final": float(shift[j] @ fs / fs.norm()) if fs.norm() > 0 else 0.0,
            }
            if direction is not None and layer in direction.layers:
                v = direction.vector(layer).float()
                r["cos_direction"] = (
                    float(torch.nn.functional.cosine_similarity(shift[j], v, dim=0)) if shift[j].norm() > 0 else 0.0
                )
                r["proj_direction"] = float(shift[j] @ v / v.norm())
            rows.append(r)
    checkpoints = [done[s] for s in traj.steps]
    meta = {"layers": layers, "kind": traj.kind, "steps": traj.steps, "step0": traj.step0}
    return TrackResult(traj.name, checkpoints, rows, meta)
