"""Hook points on the residual stream, with context managers whose hooks always come off.

There is one hook point per decoder layer: ``blocks.{l}.hook_resid_post`` (TransformerLens's
name), the output of decoder layer ``l`` (see :mod:`emis_interp.models` for the convention).

Every hook emis_interp installs (on decoder layers, the embeddings, attention or MLP outputs, the
decoder stack) goes through :func:`register`, so :func:`n_active_hooks` counts and
:func:`remove_all_hooks` removes all of them, on any submodule of the model.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import Tensor

from .manifest import adapters_disabled
from .models import check_layers, decoder_layers, unwrap_peft

ResidFn = Callable[[int, Tensor, dict], Tensor | None]
_OURS: set[int] = set()  # ids of the hook handles emis_interp installed (HF installs its own, e.g. for hidden_states)


def hook_name(layer: int) -> str:
    return f"blocks.{layer}.hook_resid_post"


def register(module: torch.nn.Module, hook: Callable, *, pre: bool = False, with_kwargs: bool = False):
    """Register a forward (``pre=False``) or forward-pre hook on ``module`` as an emis_interp hook.

    Returns the handle; remove it with :func:`unregister` (or ``handle.remove()``)."""
    if pre:
        h = module.register_forward_pre_hook(hook, with_kwargs=with_kwargs)
    else:
        h = module.register_forward_hook(hook, with_kwargs=with_kwargs)
    _OURS.add(h.id)
    return h


def unregister(handles) -> None:
    for h in handles:
        h.remove()
        _OURS.discard(h.id)


def generation_phase(kwargs: dict) -> str:
    """``"prefill"``, ``"decode"`` or ``"forward"`` (no KV cache: a teacher-forced pass) for one call
    of the decoder stack (``Qwen2Model``), from the keyword arguments ``generate`` passes it.

    transformers 5 passes the KV cache as ``cache`` (``past_key_values`` before 5.x). A call is a
    decode step when the cache already holds tokens *and* it feeds one new token per row; a call on
    an empty cache, or one that feeds several tokens on top of a filled cache (a multi-turn
    continuation, prefix caching), is a prefill of those tokens. A plain ``model(**batch)`` passes no
    cache. (Assisted/speculative decoding, which feeds several draft tokens per step, counts as prefill.)
    """
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    if cache is None or not hasattr(cache, "get_seq_length"):
        return "forward"
    x = kwargs.get("input_ids")
    x = kwargs.get("inputs_embeds") if x is None else x
    new_tokens = x.shape[1] if x is not None else 1
    return "decode" if new_tokens == 1 and cache.get_seq_length() > 0 else "prefill"


# --- generate's compiled decode step skips hooks: keep it off while an intervention is active --------

_GUARD = "_emis_interp_compile_guard"


def _generation_owner(model):
    m = unwrap_peft(model)
    return m if getattr(m, "generation_config", None) is not None else None


def _hold_compile_guard(model) -> None:
    owner = _generation_owner(model)
    if owner is None:
        return
    count, saved = getattr(owner, _GUARD, (0, None))
    if count == 0:
        saved = owner.generation_config.disable_compile
        owner.generation_config.disable_compile = True
    setattr(owner, _GUARD, (count + 1, saved))


def _drop_compile_guard(model) -> None:
    owner = _generation_owner(model)
    if owner is None or not hasattr(owner, _GUARD):
        return
    count, saved = getattr(owner, _GUARD)
    if count <= 1:
        release_compile_guard(model)
    else:
        setattr(owner, _GUARD, (count - 1, saved))


def release_compile_guard(model) -> None:
    """Restore ``generation_config.disable_compile`` as it was before the first active intervention."""
    owner = _generation_owner(model)
    if owner is not None and hasattr(owner, _GUARD):
        owner.generation_config.disable_compile = getattr(owner, _GUARD)[1]
        delattr(owner, _GUARD)


def decoder_stack(model) -> torch.nn.Module:
    """The module that runs the decoder layers (``Qwen2Model``), through any PEFT wrapping."""
    layers = decoder_layers(model)
    for m in model.modules():
        if getattr(m, "layers", None) is layers:
            return m
    raise AssertionError("decoder layers without a parent module")


@contextmanager
def tracked_phase(model, track: bool = True, check: Callable[[str, dict], None] | None = None) -> Iterator[dict]:
    """The one place that tells prefill from decode: yields ``{"phase": ...}``, set by a pre-hook on the decoder
    stack to :func:`generation_phase` once per forward pass, before any layer runs (``track=False``: stays
    ``"forward"``, and costs nothing); ``check(phase, kwargs)`` may refuse a pass. While active, ``generate``
    does not compile its decode step (a compiled graph would skip hooks). Everything comes off on exit."""
    state = {"phase": "forward"}

    def stack_pre(module, args, kwargs):
        if track:
            state["phase"] = generation_phase(kwargs)
            if check is not None:
                check(state["phase"], kwargs)
        return None

    _hold_compile_guard(model)
    handles = []
    try:
        handles.append(register(decoder_stack(model), stack_pre, pre=True, with_kwargs=True))
        yield state
    finally:
        unregister(handles)
        _drop_compile_guard(model)


@contextmanager
def residual_hooks(model, fns: dict[int, ResidFn]) -> Iterator[None]:
    """Run ``fns[l](l, resid, info)`` on the output of decoder layer ``l``; a returned tensor replaces it.

    ``resid`` is ``Float[Tensor, "batch pos d_model"]``; ``info["phase"]`` is ``"prefill"``,
    ``"decode"`` or ``"forward"`` (:func:`tracked_phase`) and ``info["decode"]`` is
    ``info["phase"] == "decode"``. Works with Qwen2 layers returning a tensor (transformers 5) or a
    tuple (older releases). While active, ``generate`` does not compile its decode step (a compiled
    graph would skip these hooks). Hooks are removed on exit, also when the body raises.
    """
    layers = decoder_layers(model)
    check_layers(model, list(fns))

    def make(idx: int, fn: ResidFn, state: dict):
        def post(module, args, output):
            resid = output[0] if isinstance(output, tuple) else output
            new = fn(idx, resid, {"decode": state["phase"] == "decode", "phase": state["phase"]})
            if new is None:
                return None
            return (new, *output[1:]) if isinstance(output, tuple) else new

        return post

    with tracked_phase(model) as state:
        handles = []
        try:
            for layer, fn in fns.items():
                handles.append(register(layers[layer], make(layer % len(layers), fn, state)))
            yield
        finally:
            unregister(handles)


class StopForward(Exception):
    """Raised inside a hook to end a forward pass once the last needed layer has run."""


def _hook_dicts(module: torch.nn.Module):
    return (module._forward_hooks, module._forward_pre_hooks)


def remove_all_hooks(model) -> None:
    """Remove every emis_interp hook on any submodule of ``model`` (a last resort after a crashed notebook cell)."""
    for m in model.modules():
        for d in _hook_dicts(m):
            for hid in [k for k in d if k in _OURS]:
                del d[hid]
                m._forward_hooks_with_kwargs.pop(hid, None)
                m._forward_pre_hooks_with_kwargs.pop(hid, None)
                m._forward_hooks_always_called.pop(hid, None)
                _OURS.discard(hid)
    release_compile_guard(model)


def n_active_hooks(model) -> int:
    """How many emis_interp hooks are on ``model`` or any of its submodules (HF's own hooks are not counted)."""
    return sum(k in _OURS for m in model.modules() for d in _hook_dicts(m) for k in d)


def cacheable(model) -> tuple[bool, str]:
    """``(ok, why_not)``: a forward pass may use a cache only with no intervention hook and adapters on."""
    if n_active_hooks(model):
        return False, "an emis_interp intervention hook is active"
    if adapters_disabled(model):
        return False, "the model's adapters are disabled"
    return True, ""
