"""Steering (adding a direction) and directional ablation (projection removal) as context managers.

**Alpha units.** ``steer(model, direction, alpha)`` adds ``alpha * direction.vector(l)`` to the
residual stream after decoder layer ``l``: alpha is in units of the direction's *own raw
magnitude*. For a model-diff direction, ``alpha = 1`` adds one average fine-tuning shift to the
aligned model, and ``alpha = -4`` removes four of them from the fine-tuned one. ``alpha = 0`` is
an exact no-op. ``alpha`` may be a per-row tensor ``Float[Tensor, " batch"]`` so that a whole
dose-response sweep runs as one batch.

**Positions.** ``"all"`` steers every position; ``"prompt"`` and ``"response"`` refer to
generation: the prefill pass (the prompt) versus the decode steps (the generated answer). For a
single teacher-forced forward pass, pass a boolean mask ``Bool[Tensor, "batch pos"]`` instead,
e.g. ``batch.response_mask``.

**Ablation.** ``ablate(model, direction, layers)`` replaces the residual ``h`` after each layer
``l`` by ``h - (h . u) u`` with ``u`` the unit direction (of layer ``l``, or of ``source_layer``
at every layer). Hooks come off on exit, also when the body raises.

**Backends.** The hooks sit on the HF model's decoder layers, so they act in plain forward passes,
in ``generate`` (dynamic or static KV cache) and in the ``"torch"`` and ``"nnsight"`` capture
backends (tested). One subtlety: nnsight reads a module's ``.output`` before PyTorch forward
hooks run, so at the steered layer itself the nnsight backend reports the pre-steering value;
every later layer sees the steering. The ``"transformer_lens"`` backend runs a bridge booted on a *copy* of the
model, so interventions made here do not reach it; use TL's own hooks on the bridge there.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from .directions import PersonaDirection
from .errors import check_alpha, check_finite
from .hooks import residual_hooks
from .models import check_layers, d_model, decoder_layers

POSITIONS = ("all", "prompt", "response")


def _check_direction(model, direction: PersonaDirection) -> None:
    if direction.d_model != d_model(model):
        raise ValueError(
            f"direction has d_model={direction.d_model} but the model has d_model={d_model(model)}; "
            "extract the direction from this model family (same size) or pass the matching model."
        )
    check_finite(direction.vectors, "direction")


def _position_gate(positions, resid: Tensor, info: dict) -> Tensor | None:
    """A ``(batch, pos, 1)`` 0/1 gate for the current call, or None to steer every position."""
    if isinstance(positions, Tensor):
        if positions.shape != resid.shape[:2]:
            if info["decode"]:
                return None if positions.ndim == 0 else torch.ones_like(resid[..., :1])
            raise ValueError(
                f"position mask {tuple(positions.shape)} does not match activations {tuple(resid.shape[:2])}"
            )
        return positions.to(resid.device, resid.dtype).unsqueeze(-1)
    if positions == "all":
        return None
    want_decode = positions == "response"
    return None if info["decode"] == want_decode else torch.zeros_like(resid[..., :1])


@contextmanager
def add_vectors(
    model,
    deltas: dict[int, Float[Tensor, " d_model"] | Float[Tensor, "batch d_model"]],
    positions: str | Bool[Tensor, "batch pos"] = "all",
) -> Iterator[None]:
    """Add ``deltas[l]`` (one vector, or one per batch row) to the residual after layer ``l``."""
    if isinstance(positions, str) and positions not in POSITIONS:
        raise ValueError(f"positions must be one of {POSITIONS} or a bool mask, got {positions!r}")
    check_layers(model, list(deltas))

    def fn(layer, resid, info):
        gate = _position_gate(positions, resid, info)
        delta = deltas[layer].to(resid.device, resid.dtype)
        delta = delta[:, None, :] if delta.ndim == 2 else delta
        if delta.ndim == 3 and delta.shape[0] != resid.shape[0]:
            raise ValueError(f"per-row steering has {delta.shape[0]} rows but the batch has {resid.shape[0]}")
        return resid + (delta if gate is None else gate * delta)

    with residual_hooks(model, {layer: fn for layer in deltas}):
        yield


@contextmanager
def steer(
    model,
    direction: PersonaDirection,
    alpha: float | int | Float[Tensor, " batch"],
    layers=None,
    positions: str | Bool[Tensor, "batch pos"] = "all",
) -> Iterator[None]:
    """Add ``alpha * direction.vector(l)`` after each layer ``l`` in ``layers`` (default: all of the direction's)."""
    check_alpha(alpha)
    _check_direction(model, direction)
    layers = check_layers(model, direction.layers if layers is None else layers)
    if isinstance(alpha, (int, float)) and alpha == 0:
        yield  # exact no-op: no hooks at all
        return
    if isinstance(alpha, Tensor):
        deltas = {layer: alpha.float()[:, None] * direction.vector(layer).float()[None] for layer in layers}
    else:
        deltas = {layer: float(alpha) * direction.vector(layer).float() for layer in layers}
    with add_vectors(model, deltas, positions):
        yield


@contextmanager
def ablate_writes(model, direction: PersonaDirection, source_layer: int) -> Iterator[None]:
    """Remove one unit direction from *every write* to the residual stream (embeddings, each
    attention and MLP output): the runtime twin of :func:`emis_interp.export.orthogonalize`."""
    _check_direction(model, direction)
    u = direction.unit(source_layer).float()
    layers = decoder_layers(model)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    modules = [base.get_input_embeddings()] + [
        m for layer in layers for m in (layer.self_attn.o_proj, layer.mlp.down_proj)
    ]

    def hook(module, args, out):
        uu = u.to(out.device, out.dtype)
        return out - (out @ uu).unsqueeze(-1) * uu

    handles = []
    try:
        for m in modules:
            handles.append(m.register_forward_hook(hook))
        yield
    finally:
        for h in handles:
            h.remove()


@contextmanager
def ablate(model, direction: PersonaDirection, layers=None, source_layer: int | None = None) -> Iterator[None]:
    """Remove the direction's component from the residual after each layer in ``layers``.

    By default each layer uses its own vector; with ``source_layer``, that layer's unit vector is
    removed at every layer (as in single-direction ablation across the stream). To remove it from
    every write into the stream (what an exported orthogonalized checkpoint does), use
    :func:`ablate_writes`.
    """
    _check_direction(model, direction)
    layers = check_layers(model, direction.layers if layers is None else layers)
    units = {layer: direction.unit(layer if source_layer is None else source_layer).float() for layer in layers}

    def fn(layer, resid, info):
        u = units[layer].to(resid.device, resid.dtype)
        return resid - (resid @ u).unsqueeze(-1) * u

    with residual_hooks(model, {layer: fn for layer in layers}):
        yield
