"""Capture residual-stream activations at chosen layers, reduced per conversation, with caching.

Backends (same numbers on fp32 models, also on PEFT/LoRA models; tested):

- ``"torch"`` (default, fast): forward hooks on the decoder layers; the forward pass stops after
  the last requested layer, so no later layer and no ``lm_head`` is computed. Sees emis_interp
  interventions (steering/ablation hooks).
- ``"nnsight"``: an nnsight 0.8 ``TransformersModel`` trace saving the decoder layers' outputs,
  reached through any PEFT wrapping. Sees emis_interp interventions. The wrapper is built once per
  model and kept *on the model object* (not in a global table), so it is freed with the model.
  nnsight installs an inert controller ``forward`` on each module of the model, permanently.
- ``"transformer_lens"``: a TransformerLens 4 ``TransformerBridge`` reading
  ``blocks.{l}.hook_resid_post``. Booting rewrites HF modules in place and forces eager
  attention, so it boots on a *structural* copy of the model: new module objects and config, but
  every parameter and buffer is the live model's own tensor (``copy.deepcopy`` with those tensors
  in the memo; booting edits no tensor data, tested). For a PEFT model the copy is of the base
  model with PEFT's LoRA layers injected, so LoRA runs unmerged exactly as PEFT computes it and
  nothing is merged anywhere.

  Memory: no second copy of the weights (LoRA or base); the extra cost is the module objects,
  TL's hook points (kilobytes per layer) and a zero ``vocab``-sized unembedding bias. Not free:
  eager attention materialises the ``batch x heads x pos x pos`` score tensor of one layer at a
  time (sdpa does not), and a copied
  module keeps any *plain* tensor attribute it holds outside its parameters/buffers (none in
  Qwen2; accelerate's CPU/disk-offload hooks hold such maps, so offloaded models pay for them
  again). Because the tensors are shared, in-place weight edits (``Trajectory.goto``) are seen at
  once; the bridge is rebuilt when the model's tensors are *replaced* (new parameter objects,
  ``.to()`` of buffers, dtype/device) or its adapter state or config changes (key:
  tensor identities, dtypes and devices + :func:`emis_interp.manifest.adapter_state` + config).
  A replaced tensor stays alive in the old bridge until the next TL call rebuilds it.
  The bridge runs on another module tree, so it does not see emis_interp interventions:
  :func:`run_backend` refuses the TL backend while one is active; other ad-hoc torch hooks on
  the live model are not seen either (and are not copied into the bridge).

Reductions (per conversation): ``"last_prompt"`` (the last prompt token, i.e. the ``\\n`` after
``<|im_start|>assistant``), ``"mean_response"``, ``"mean_prompt"``, and ``"all"`` (every real
token, streamed to disk shard by shard, never held in full).
"""

from __future__ import annotations

import copy
import json
import shutil
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from . import cache as _cache
from .conversations import Batch, Conversation, as_conversations, iter_batches, prompt_set_hash
from .errors import ConfigError, check_finite, check_nonempty
from .fingerprint import library_versions, model_state, placement_state
from .hooks import StopForward, cacheable, hook_name, n_active_hooks, residual_hooks
from .manifest import Manifest, adapter_state, cache_valid, digest, source_digest, tokenizer_state, write_manifest
from .models import check_layers, d_model, decoder_layers, model_device, unwrap_peft

REDUCTIONS = ("last_prompt", "mean_response", "mean_prompt", "all")
BACKENDS = ("torch", "nnsight", "transformer_lens")


@dataclass
class Activations:
    """Reduced activations ``Float[Tensor, "n layer d_model"]`` (fp32, CPU), one row per conversation."""

    acts: Float[Tensor, "n layer d_model"]
    layers: list[int]
    reduction: str
    meta: dict = field(default_factory=dict)

    def layer(self, layer: int) -> Float[Tensor, "n d_model"]:
        return self.acts[:, self.layers.index(layer)]

    def mean(self) -> Float[Tensor, "layer d_model"]:
        return self.acts.mean(0)

    def __len__(self) -> int:
        return self.acts.shape[0]

    def __repr__(self) -> str:
        return f"Activations(n={len(self)}, layers={self.layers}, reduction={self.reduction!r}, d_model={self.acts.shape[-1]})"

    def _repr_html_(self) -> str:
        norms = self.acts.norm(dim=-1).mean(0).tolist()
        rows = "".join(
            f"<tr><td>{layer}</td><td>{n:.4g}</td></tr>" for layer, n in zip(self.layers, norms, strict=True)
        )
        return (
            f"<b>Activations</b> n={len(self)}, reduction={self.reduction}, cache hit={self.meta.get('cache_hit')}"
            f"<table><tr><th>layer</th><th>mean norm</th></tr>{rows}</table>"
        )


def reduce(resid: Float[Tensor, "batch pos d_model"], batch: Batch, reduction: str) -> Float[Tensor, "batch d_model"]:
    """Reduce one layer's residual over positions, in fp32."""
    resid = resid.float()
    if reduction == "last_prompt":
        idx = batch.last_prompt_index.to(resid.device)
        return resid[torch.arange(resid.shape[0], device=resid.device), idx]
    mask: Bool[Tensor, "batch pos"]
    if reduction == "mean_response":
        mask = batch.response_mask
        if not mask.any(-1).all():
            raise ValueError("reduction 'mean_response' needs an assistant response in every conversation")
    elif reduction == "mean_prompt":
        mask = batch.prompt_mask
    else:
        raise ValueError(f"unknown reduction {reduction!r}; choose one of {REDUCTIONS}")
    m = mask.to(resid.device, resid.dtype).unsqueeze(-1)
    return (resid * m).sum(1) / m.sum(1)


# --- backends: each returns {layer: Float[Tensor, "batch pos d_model"]} for one batch -------------


def _run_torch(model, batch: Batch, layers: list[int]) -> dict[int, Tensor]:
    out: dict[int, Tensor] = {}
    last = max(layers)

    def grab(layer, resid, info):
        out[layer] = resid
        if layer == last:
            raise StopForward
        return None

    with residual_hooks(model, {layer: grab for layer in layers}):
        try:
            model(**batch.model_inputs(), use_cache=False)
        except StopForward:
            pass
    return out


_SLOT_ATTR = "_emis_interp_backends"
_LIBRARY_HOOK_MODULES = ("transformers", "accelerate", "peft", "torch")


class _BackendSlot:
    """Per-model holder of backend wrappers, stored in the model object's ``__dict__``.

    It lives exactly as long as the model: a wrapper's reference back to the model is an ordinary
    reference cycle that ``gc`` collects (a module-level ``WeakKeyDictionary`` whose *value*
    references its key never frees the entry). Copying or pickling the model gives an empty slot:
    wrappers are rebuilt on demand, never copied.
    """

    __slots__ = ("nnsight", "nnsight_layers", "nnsight_env", "bridge", "bridge_key")

    def __init__(self) -> None:
        self.nnsight = self.nnsight_layers = self.nnsight_env = self.bridge = self.bridge_key = None

    def __copy__(self) -> _BackendSlot:
        return _BackendSlot()

    def __deepcopy__(self, memo) -> _BackendSlot:
        return _BackendSlot()

    def __reduce__(self):
        return (_BackendSlot, ())


def _slot(model) -> _BackendSlot:
    slot = model.__dict__.get(_SLOT_ATTR)
    if slot is None:
        slot = _BackendSlot()
        object.__setattr__(model, _SLOT_ATTR, slot)  # a plain attribute: no submodule, parameter or buffer
    return slot


def _module_path(model, target) -> str:
    for name, module in model.named_modules():
        if module is target:
            return name
    raise ConfigError(f"{type(target).__name__} is not a submodule of {type(model).__name__}")


def _run_nnsight(model, batch: Batch, layers: list[int], tokenizer) -> dict[int, Float[Tensor, "batch pos d_model"]]:
    from nnsight import TransformersModel

    slot = _slot(model)
    blocks = decoder_layers(model)
    if slot.nnsight is None or slot.nnsight_layers is not blocks:
        # a copy of the tokenizer: nnsight normalises the one it is given (pad token, padding side)
        lm = TransformersModel(model, tokenizer=copy.deepcopy(tokenizer))
        # the decoder layers' envoy, by the path models.decoder_layers takes (through PEFT wrapping:
        # PeftModel.base_model.model.model.layers), not by the plain model's ``model.layers``
        env = lm
        for part in _module_path(model, blocks).split("."):
            env = getattr(env, part)
        slot.nnsight, slot.nnsight_layers, slot.nnsight_env = lm, blocks, env
    lm, env = slot.nnsight, slot.nnsight_env
    saved = {}
    with lm.trace(dict(batch.model_inputs(), use_cache=False)):
        for layer in layers:
            saved[layer] = env[layer].output.save()
    return {layer: (v[0] if isinstance(v, tuple) else v) for layer, v in saved.items()}


def _tl_source(model):
    """The HF causal LM to boot TL on: ``model``, or for a PEFT model its base model with the
    LoRA layers injected (they compute base + LoRA delta themselves, so nothing is merged)."""
    if not hasattr(model, "peft_config"):
        return model
    prompt = [n for n, c in model.peft_config.items() if getattr(c, "is_prompt_learning", False)]
    if prompt:
        raise ConfigError(
            f"PEFT adapter(s) {prompt} are prompt-learning adapters, which act in PeftModel.forward and not in "
            "the base model's modules, so a TransformerLens bridge cannot include them. Use backend='torch' or "
            "'nnsight'."
        )
    if hasattr(model, "get_base_model"):  # PeftModel
        return unwrap_peft(model)
    return model.model  # a bare LoraModel


def _bridge_key(model) -> tuple:
    """What the bridge depends on beyond the *values* of the shared tensors (those it reads live).

    Tensor identities are a sound key: the cached bridge holds every tensor it was built from, so
    no other live tensor can take one of their ids while it exists.
    """
    tensors = tuple(
        (name, id(t), t.dtype, t.device)
        for name, t in [
            *model.named_parameters(remove_duplicate=False),
            *model.named_buffers(remove_duplicate=False),
        ]
    )
    config = json.dumps(model.config.to_dict(), sort_keys=True, default=str)
    return tensors, digest(adapter_state(model)), config


def _structural_copy(module):
    """``module`` with new module objects and config but the *same* parameter and buffer tensors.

    User hooks on the live modules are not carried over (a hook present at copy time would
    otherwise keep firing in the bridge after it is removed from the model); the libraries' own
    hooks (transformers' output recorders, accelerate's device alignment) are kept.
    """
    memo = {id(t): t for t in [*module.parameters(), *module.buffers()]}
    out = copy.deepcopy(module, memo)
    for m in out.modules():
        for hooks in (m._forward_hooks, m._forward_pre_hooks, m._backward_hooks, m._backward_pre_hooks):
            for hid, fn in list(hooks.items()):
                owner = getattr(getattr(fn, "func", fn), "__module__", "") or ""
                if owner.split(".")[0] not in _LIBRARY_HOOK_MODULES:
                    del hooks[hid]
                    m._forward_hooks_with_kwargs.pop(hid, None)
                    m._forward_hooks_always_called.pop(hid, None)
                    m._forward_pre_hooks_with_kwargs.pop(hid, None)
    return out


def _boot_bridge(model, tokenizer):
    from transformer_lens.model_bridge import TransformerBridge

    source = _tl_source(model)
    name = getattr(source.config, "_name_or_path", "") or "qwen2"
    return TransformerBridge.boot_transformers(
        name,
        hf_model=_structural_copy(source),
        tokenizer=copy.deepcopy(tokenizer),  # TL normalises the tokenizer it is given (sets bos_token, ...)
        dtype=next(source.parameters()).dtype,
    )


def _run_transformer_lens(
    model, batch: Batch, layers: list[int], tokenizer
) -> dict[int, Float[Tensor, "batch pos d_model"]]:
    slot = _slot(model)
    key = _bridge_key(model)
    if slot.bridge is None or slot.bridge_key != key:
        slot.bridge = None  # free the stale bridge (and the replaced tensors it holds) before booting
        slot.bridge, slot.bridge_key = _boot_bridge(model, tokenizer), key
    names = [hook_name(layer) for layer in layers]
    _, cache = slot.bridge.run_with_cache(
        batch.input_ids,
        attention_mask=batch.attention_mask,
        position_ids=batch.position_ids,
        names_filter=lambda n: n in names,
        stop_at_layer=max(layers) + 1,
    )
    return {layer: cache[hook_name(layer)] for layer in layers}


def run_backend(
    model, tokenizer, batch: Batch, layers: list[int], backend: str = "torch"
) -> dict[int, Float[Tensor, "batch pos d_model"]]:
    """Residual stream ``{layer: Float[Tensor, "batch pos d_model"]}`` for one batch, via ``backend``."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {BACKENDS}")
    if backend == "transformer_lens" and (n := n_active_hooks(model)):
        raise ConfigError(
            f"backend='transformer_lens' runs on its own copy of the module tree, so the {n} emis_interp "
            "intervention hook(s) active on this model (steer/ablate) would be silently ignored. Capture with "
            "backend='torch' or backend='nnsight' (both see interventions), or capture outside the intervention."
        )
    batch = batch.to(model_device(model))
    with torch.no_grad():
        if backend == "torch":
            return _run_torch(model, batch, layers)
        if backend == "nnsight":
            return _run_nnsight(model, batch, layers, tokenizer)
        return _run_transformer_lens(model, batch, layers, tokenizer)


def capture_code() -> str:
    """Digest of the code that determines a capture (this module, prompt formatting, hooks): a cached entry made
    by other code is recomputed."""
    import sys

    from . import conversations, hooks

    return source_digest(sys.modules[__name__], conversations, hooks)


def capture_manifest(model, tokenizer, convs, layers, reduction, backend) -> Manifest:
    """Everything that determines a capture: model weights and adapter state, backend, tokenizer and
    chat template, prompts, layers and reduction."""
    return Manifest(
        "capture",
        {
            "code": capture_code(),
            "model": model_state(model),
            "placement": placement_state(model),  # dtype, devices, attention implementation
            "versions": library_versions(),
            "backend": backend,
            **tokenizer_state(tokenizer),
            "prompts": prompt_set_hash(convs),
            "n": len(convs),
            "layers": layers,
            "reduction": reduction,
        },
    )


def capture(
    model,
    tokenizer,
    conversations: Sequence[Conversation | str | dict],
    layers,
    reduction: str = "last_prompt",
    *,
    backend: str = "torch",
    batch_size: int = 16,
    cache_dir: str | Path | None = _cache.DEFAULT_CACHE_DIR,
    progress: bool = True,
) -> Activations | TokenActivations:
    """Capture reduced residual activations at ``layers`` for each conversation.

    Returns :class:`Activations` (``acts``: ``Float[Tensor, "n layer d_model"]``, fp32, CPU, in
    the input order), or for ``reduction="all"`` a :class:`TokenActivations` handle on disk.
    With ``cache_dir`` set (default ``cache/``), results are cached as safetensors; pass
    ``cache_dir=None`` to disable. Entries are identified by a :class:`~emis_interp.manifest.Manifest`
    (a mismatch recomputes). While an intervention hook is active or the adapters are disabled,
    the cache is neither read nor written (``meta["cache_bypassed"]`` says why).
    """
    convs = as_conversations(conversations)
    check_nonempty(convs, "prompt set")
    layers = check_layers(model, layers)
    if reduction not in REDUCTIONS:
        raise ValueError(f"unknown reduction {reduction!r}; choose one of {REDUCTIONS}")
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {BACKENDS}")
    ok, bypass = cacheable(model)
    use_cache = cache_dir is not None and ok
    manifest = capture_manifest(model, tokenizer, convs, layers, reduction, backend) if use_cache else None
    if reduction == "all":
        if cache_dir is None:
            raise ValueError("reduction='all' streams to disk; pass a cache_dir")
        # an intervened pass streams to a fresh directory with no manifest: no later call can take it for a
        # cache hit, and the caller owns it (TokenActivations.path; delete it when done)
        name = manifest.key if use_cache else f"uncached-{uuid.uuid4().hex[:12]}"
        return _capture_all(
            model, tokenizer, convs, layers, backend, batch_size, Path(cache_dir) / "tokens" / name, progress, manifest
        )

    def compute() -> dict[str, Tensor]:
        acts = torch.empty(len(convs), len(layers), d_model(model))
        batches = iter_batches(tokenizer, convs, batch_size)
        n_batches = -(-len(convs) // batch_size)
        for idx, batch in tqdm(batches, total=n_batches, desc="capture", disable=not progress or n_batches < 4):
            out = run_backend(model, tokenizer, batch, layers, backend)
            for j, layer in enumerate(layers):
                red = check_finite(
                    reduce(out[layer], batch.to(out[layer].device), reduction), f"activations at layer {layer}"
                )
                acts[idx, j] = red.cpu()
        return {"acts": acts}

    meta = {"layers": json.dumps(layers), "reduction": reduction, "n": str(len(convs))}
    if not use_cache:
        tensors, hit = compute(), False
    else:
        tensors, hit = _cache.cached(Path(cache_dir) / "acts" / f"{manifest.key}.safetensors", compute, manifest, meta)
    info = {"cache_hit": hit, "prompt_hash": prompt_set_hash(convs), "backend": backend}
    if cache_dir is not None and not ok:
        info["cache_bypassed"] = bypass
    return Activations(tensors["acts"], layers, reduction, info)


@dataclass
class TokenActivations:
    """Per-token activations on disk: shards of ``acts`` ``(n_tok, layer, d_model)`` with ``row``/``pos`` indices.

    ``row`` is the conversation index, ``pos`` the token's index within the conversation (no padding).
    """

    path: Path
    layers: list[int]

    def shards(self) -> Iterator[dict[str, Tensor]]:
        for f in sorted(self.path.glob("shard-*.safetensors")):
            yield _cache.verified_load(f)[0]

    def conversation(self, i: int) -> Float[Tensor, "pos layer d_model"]:
        for s in self.shards():
            sel = s["row"] == i
            if sel.any():
                return s["acts"][sel][s["pos"][sel].argsort()]
        raise IndexError(f"no conversation {i} in {self.path}")


def _capture_all(
    model, tokenizer, convs, layers, backend, batch_size, path: Path, progress, manifest: Manifest | None
) -> TokenActivations:
    if manifest is not None and cache_valid(path, manifest):  # the manifest is written last: it marks a complete entry
        handle = TokenActivations(path, layers)
        try:
            for _ in handle.shards():
                pass
            return handle
        except _cache.CorruptCacheError:
            pass
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    n_batches = -(-len(convs) // batch_size)
    for k, (idx, batch) in enumerate(
        tqdm(iter_batches(tokenizer, convs, batch_size), total=n_batches, desc="capture(all)", disable=not progress)
    ):
        out = run_backend(model, tokenizer, batch, layers, backend)
        stacked: Float[Tensor, "batch pos layer d_model"] = torch.stack(
            [out[layer].float().cpu() for layer in layers], 2
        )
        real = batch.attention_mask.bool()
        pos: Int[Tensor, "batch pos"] = batch.position_ids
        rows = torch.tensor(idx).unsqueeze(1).expand_as(real)
        acts = check_finite(stacked[real], "activations")
        _cache.atomic_save({"acts": acts, "row": rows[real], "pos": pos[real]}, path / f"shard-{k:05d}.safetensors")
    if manifest is not None:
        write_manifest(path, manifest)
    return TokenActivations(path, layers)
