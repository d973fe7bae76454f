"""Hook points on the residual stream, with context managers whose hooks always come off.

There is one hook point per decoder layer: ``blocks.{l}.hook_resid_post`` (TransformerLens's
name), the output of decoder layer ``l`` (see :mod:`emis_interp.models` for the convention).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from torch import Tensor

from .models import check_layers, decoder_layers

ResidFn = Callable[[int, Tensor, dict], Tensor | None]
_OURS: set[int] = set()  # ids of the hook handles emis_interp installed (HF installs its own, e.g. for hidden_states)


def hook_name(layer: int) -> str:
    return f"blocks.{layer}.hook_resid_post"


@contextmanager
def residual_hooks(model, fns: dict[int, ResidFn]) -> Iterator[None]:
    """Run ``fns[l](l, resid, info)`` on the output of decoder layer ``l``; a returned tensor replaces it.

    ``resid`` is ``Float[Tensor, "batch pos d_model"]``; ``info["decode"]`` is True on generation
    steps after the prefill. Works with Qwen2 layers returning a tensor (transformers 5) or a
    tuple (older releases). Hooks are removed on exit, also when the body raises.
    """
    layers = decoder_layers(model)
    check_layers(model, list(fns))
    handles = []
    state: dict[int, bool] = {}

    def make(idx: int, fn: ResidFn):
        def pre(module, args, kwargs):
            cache = kwargs.get("past_key_values")
            hidden = args[0] if args else kwargs.get("hidden_states")
            decode = False
            if cache is not None and hasattr(cache, "get_seq_length"):
                try:
                    decode = cache.get_seq_length(module.self_attn.layer_idx) > 0
                except (AttributeError, TypeError, IndexError):
                    decode = False
            state[idx] = decode and hidden is not None
            return None

        def post(module, args, output):
            resid = output[0] if isinstance(output, tuple) else output
            new = fn(idx, resid, {"decode": state.get(idx, False)})
            if new is None:
                return None
            return (new, *output[1:]) if isinstance(output, tuple) else new

        return pre, post

    try:
        for layer, fn in fns.items():
            pre, post = make(layer % len(layers), fn)
            handles.append(layers[layer].register_forward_pre_hook(pre, with_kwargs=True))
            handles.append(layers[layer].register_forward_hook(post))
            _OURS.update(h.id for h in handles[-2:])
        yield
    finally:
        for h in handles:
            h.remove()
            _OURS.discard(h.id)


class StopForward(Exception):
    """Raised inside a hook to end a forward pass once the last needed layer has run."""


def remove_all_hooks(model) -> None:
    """Remove every emis_interp hook on the decoder layers (a last resort after a crashed notebook cell)."""
    for layer in decoder_layers(model):
        for d in (layer._forward_hooks, layer._forward_pre_hooks):
            for hid in [k for k in d if k in _OURS]:
                del d[hid]
                _OURS.discard(hid)


def n_active_hooks(model) -> int:
    """How many emis_interp hooks are on the decoder layers (HF's own hooks are not counted)."""
    return sum(k in _OURS for m in decoder_layers(model) for d in (m._forward_hooks, m._forward_pre_hooks) for k in d)
