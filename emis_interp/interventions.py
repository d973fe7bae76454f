"""Steering (adding a direction) and directional ablation (projection removal), on one engine.

Everything that edits the residual stream goes through :class:`Intervention`: per-layer vectors
to add, per-layer unit directions to project out, and/or one unit direction to remove from every
*write* into the residual stream, each either shared by the batch (``Float[Tensor, "d_model"]``)
or one per batch row (``Float[Tensor, "batch d_model"]``). :func:`steer`, :func:`ablate`,
:func:`ablate_writes`, :func:`emis_interp.sampling.rowwise` (batched sweeps) and the weight
export :mod:`emis_interp.export` all use its two maths functions, :func:`project_out` and
:func:`add_vector`. Its tensors are moved once to each layer's device and dtype (taken from the
activation they act on, so ``device_map``-sharded models work) and cached.

**Alpha units.** ``steer(model, direction, alpha, layers=[l])`` adds ``alpha * direction.vector(l)``
to the residual stream after decoder layer ``l``: alpha is in units of the direction's *own raw
magnitude*. For a model-diff direction, ``alpha = 1`` adds one average fine-tuning shift to the
aligned model, and ``alpha = -4`` removes four of them from the fine-tuned one. ``alpha = 0`` is
an exact no-op. ``alpha`` may be a per-row tensor ``Float[Tensor, " batch"]`` so that a whole
dose-response sweep runs as one batch. ``layers`` is required unless the direction covers exactly
one layer: steering several layers adds one shift per layer, and the shifts add up down the stream.

**Positions** (steering only; ablation acts at every position). ``"all"`` steers every position.
During ``generate`` (the persona-vectors convention, left padding): ``"prompt"`` steers every
position of the prefill pass and no decode step; ``"response"`` steers the last prompt position
in the prefill pass (whose output is the first answer token) and then every generated token. In a
teacher-forced forward pass there is no prefill/decode split: pass a boolean mask
``Bool[Tensor, "batch pos"]`` instead, e.g. ``positions=batch.response_mask``; a string other than
``"all"`` raises there.

**Ablation.** ``ablate(model, direction, layers)`` replaces the residual ``h`` after each layer
``l`` by ``h - (h . u) u`` with ``u`` the unit direction (of layer ``l``, or of ``source_layer`` at
every layer). :func:`ablate_writes` removes one unit direction from every write into the stream
(embeddings, each attention and each MLP output). That is the runtime twin of the exported
orthogonalised checkpoint (:func:`emis_interp.export.export_ablated`), and it is *not* the same as
projecting only after each layer: the MLP reads the residual between attention and MLP, which the
attention output has given a component along ``u`` again. Hooks come off on exit, also when the
body raises.

**Adapters per row.** ``lora=(bank, idx)`` runs batch row ``b`` through LoRA adapter ``idx[b]`` of a
:class:`~emis_interp.lora_bank.LoraBank` (bank row 0, ``"__base__"``, is the plain model, bit for
bit): hooks on each adapted linear module add the row's low-rank delta to its output, before any
other hook of this intervention on that module sees it, so steering, ablation and projected
writes act on the adapted model. The model must be the plain base model the bank was built on.

**Backends and compilation.** The hooks sit on the HF model's modules, so they act in plain
forward passes, in ``generate`` (dynamic or static KV cache) and in the ``"torch"`` and
``"nnsight"`` capture backends (tested). ``generate`` with a static cache compiles the decode step
on CUDA, and a compiled graph skips hooks added after it was built; so while an intervention is
active, ``model.generation_config.disable_compile`` is set (and restored on exit) and generation
runs eagerly, steered at every step. One subtlety: nnsight reads a module's ``.output`` before
PyTorch forward hooks run, so at the steered layer itself the nnsight backend reports the
pre-steering value; every later layer sees the steering. The ``"transformer_lens"`` backend runs a
bridge booted on a *copy* of the model, so interventions made here do not reach it; use TL's own
hooks on the bridge there.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from .directions import PersonaDirection
from .errors import ConfigError, check_alpha, check_finite
from .hooks import decoder_stack, register, tracked_phase, unregister
from .lora_bank import LoraBank, RowPlan, apply_rows
from .models import check_layers, d_model, decoder_layers

POSITIONS = ("all", "prompt", "response")
Positions = str | Bool[Tensor, "batch pos"]
Vec = Float[Tensor, " d_model"] | Float[Tensor, "batch d_model"]


# --- the maths: one projection, one addition --------------------------------------------------------


def project_out(
    x: Float[Tensor, "*rows d_model"], u: Float[Tensor, "*urows d_model"]
) -> Float[Tensor, "*rows d_model"]:
    """``x - (x . u) u``: remove the component of ``x`` along the unit vector ``u``.

    ``u`` broadcasts against ``x``: one direction ``(d_model,)`` or one per batch row
    ``(batch, 1, d_model)``; a zero ``u`` leaves ``x`` exactly unchanged. Used on activations and,
    in :mod:`emis_interp.export`, on weight matrices (rows that write ``d_model`` vectors). Computed in fp32
    and rounded once to ``x``'s dtype, so a bf16 residual keeps no more of ``u`` than one rounding.
    """
    xf, uf = x.float(), u.float()
    coef = torch.einsum("...d,...d->...", xf, uf).unsqueeze(-1)
    return (xf - coef * uf).to(x.dtype)


def add_vector(
    x: Float[Tensor, "*rows d_model"],
    v: Float[Tensor, "*vrows d_model"],
    gate: Float[Tensor, "*grows 1"] | None = None,
) -> Float[Tensor, "*rows d_model"]:
    """``x + v`` (or ``x + gate * v`` with a 0/1 position gate); ``v`` broadcasts as in :func:`project_out`."""
    return x + v if gate is None else x + gate * v


def check_positions(positions) -> None:
    if isinstance(positions, Tensor):
        if positions.ndim != 2 or positions.dtype != torch.bool:
            raise ValueError(
                f"a position mask must be Bool[Tensor, 'batch pos'], got {positions.dtype} {tuple(positions.shape)}; "
                "pass e.g. batch.response_mask"
            )
    elif positions not in POSITIONS:
        raise ValueError(
            f"positions must be one of {POSITIONS} or a bool mask (batch.response_mask), got {positions!r}"
        )


# --- the engine ---------------------------------------------------------------------------------------


def _write_modules(model) -> list[torch.nn.Module]:
    """Every module whose output is added to the residual stream: embeddings, each o_proj and down_proj."""
    stack = decoder_stack(model)
    return [stack.embed_tokens] + [m for layer in stack.layers for m in (layer.self_attn.o_proj, layer.mlp.down_proj)]


def _left_padded(kwargs: dict) -> bool | None:
    """Whether every row of a prefill call ends with a real token (None: cannot tell)."""
    mask = kwargs.get("attention_mask")
    if isinstance(mask, Tensor) and mask.ndim == 2:
        return bool(mask[:, -1].bool().all())
    pos = kwargs.get("position_ids")
    if isinstance(pos, Tensor) and pos.ndim == 2:
        return bool((pos[:, -1] == pos.amax(-1)).all())
    return None


@dataclass(eq=False)
class Intervention:
    """What to do to the residual stream; apply it with ``with intervention.attach(model): ...``.

    - ``add[l]``: added to the residual after decoder layer ``l`` (gated by ``positions``);
    - ``project[l]``: unit direction(s) removed from the residual after decoder layer ``l``
      (applied before ``add[l]``);
    - ``project_writes``: unit direction(s) removed from every write into the residual stream
      (embeddings, each attention and MLP output), i.e. from the whole stream, as in an
      orthogonalised checkpoint;
    - ``project_components[(l, c)]``: unit direction(s) removed from the write of *one component*
      of decoder layer ``l``: ``c = "MLP"`` (the MLP's output) or ``"H{h}"`` (attention head ``h``'s
      share of ``o_proj``'s output, :func:`emis_interp.attribution.head_writes`); the other heads'
      writes are untouched. Zero rows are exact no-ops;
    - ``lora``: ``(bank, idx)``, a :class:`~emis_interp.lora_bank.LoraBank` and a LongTensor
      ``[batch]`` of bank rows (``bank.index(names)``): row ``b`` runs through adapter ``idx[b]``
      (``0``: ``"__base__"``, no adapter).

    Each tensor is ``Float[Tensor, "d_model"]`` (every row) or ``Float[Tensor, "batch d_model"]``
    (one per batch row; zero rows are exact no-ops). ``positions`` is ``"all"``, ``"prompt"``,
    ``"response"`` or ``Bool[Tensor, "batch pos"]`` (see the module docstring).
    """

    add: dict[int, Vec] = field(default_factory=dict)
    project: dict[int, Vec] = field(default_factory=dict)
    project_writes: Vec | None = None
    positions: Positions = "all"
    project_components: dict[tuple[int, str], Vec] = field(default_factory=dict)
    lora: tuple[LoraBank, Tensor] | None = None
    _cache: dict = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self):
        check_positions(self.positions)
        tensors = [*self.add.values(), *self.project.values()]
        tensors += [self.project_writes] if self.project_writes is not None else []
        dims = {t.shape[-1] for t in tensors}
        rows = {t.shape[0] for t in tensors if t.ndim == 2}
        if any(t.ndim not in (1, 2) for t in tensors) or len(dims) > 1 or len(rows) > 1:
            raise ValueError(
                "intervention tensors must all be (d_model,) or (batch, d_model) with one d_model and one batch size, "
                f"got shapes {[tuple(t.shape) for t in tensors]}"
            )
        for t in tensors:
            check_finite(t, "intervention vector")
        self.add = {int(k): v.detach().float() for k, v in self.add.items()}
        self.project = {int(k): v.detach().float() for k, v in self.project.items()}
        self.project_components = {
            (int(k[0]), str(k[1])): v.detach().float() for k, v in self.project_components.items()
        }
        if self.project_writes is not None:
            self.project_writes = self.project_writes.detach().float()
        if self.lora is not None:
            bank, idx = self.lora
            if (
                not isinstance(bank, LoraBank)
                or not isinstance(idx, Tensor)
                or idx.ndim != 1
                or idx.is_floating_point()
            ):
                raise ValueError(
                    "Intervention.lora must be (LoraBank, LongTensor[batch]) with one bank row per batch row; "
                    "build it as (bank, bank.index(names_per_row))."
                )
            idx = idx.detach().to("cpu", torch.long)
            if len(idx) and not 0 <= int(idx.min()) <= int(idx.max()) < len(bank):
                raise IndexError(f"lora rows {idx.tolist()} out of range for a bank of {len(bank)} ({bank.names})")
            if rows and rows != {len(idx)}:
                raise ValueError(
                    f"per-row intervention tensors have {rows.pop()} rows but lora has {len(idx)}; one row per sequence."
                )
            self.lora = (bank, idx)

    @property
    def layers(self) -> list[int]:
        return sorted({*self.add, *self.project})

    def _source(self, key: tuple) -> Tensor:
        kind = key[0]
        if kind == "mask":
            return self.positions.unsqueeze(-1)  # (batch, pos, 1)
        if kind == "comp":
            t = self.project_components[key[1]]
        else:
            t = {"add": self.add, "project": self.project}[kind][key[1]] if kind != "writes" else self.project_writes
        return t[:, None, :] if t.ndim == 2 else t  # per-row: (batch, 1, d_model)

    def _on(self, key: tuple, like: Tensor) -> Tensor:
        """The tensor ``key`` on ``like``'s device and dtype, moved once and cached per (key, device, dtype)."""
        ck = (key, like.device, like.dtype)
        t = self._cache.get(ck)
        if t is None:
            t = self._cache[ck] = self._source(key).to(like.device, like.dtype)
        if t.ndim == 3 and t.shape[0] != like.shape[0]:
            raise ValueError(
                f"per-row intervention has {t.shape[0]} rows but the batch has {like.shape[0]}: build one row per "
                "sequence (num_return_sequences and beams multiply the batch; pass them as separate rows instead)."
            )
        return t

    def _gate(self, resid: Tensor, phase: str) -> Tensor | None | bool:
        """None: add everywhere; False: add nowhere; else a ``(batch, pos, 1)`` 0/1 gate."""
        p = self.positions
        if isinstance(p, Tensor):
            if tuple(p.shape) != tuple(resid.shape[:2]):
                raise ValueError(
                    f"position mask {tuple(p.shape)} does not match activations {tuple(resid.shape[:2])}; a mask is for "
                    "a teacher-forced forward pass over the same batch. During generate use positions='prompt' or 'response'."
                )
            return self._on(("mask",), resid)
        if p == "all" or (p == "prompt" and phase == "prefill") or (p == "response" and phase == "decode"):
            return None
        if p == "prompt":
            return False
        gate = torch.zeros_like(resid[..., :1])  # response, prefill: the last prompt position only
        gate[:, -1] = 1
        return gate

    def apply_resid(self, layer: int, resid: Float[Tensor, "batch pos d_model"], phase: str = "forward") -> Tensor:
        out = resid
        if layer in self.project:
            out = project_out(out, self._on(("project", layer), resid))
        if layer in self.add:
            gate = self._gate(resid, phase)
            if gate is not False:
                out = add_vector(out, self._on(("add", layer), resid), gate)
        return out

    def apply_write(self, out: Float[Tensor, "batch pos d_model"]) -> Tensor:
        return project_out(out, self._on(("writes",), out))

    def apply_heads(
        self,
        layer: int,
        z: Float[Tensor, "batch pos hd"],
        out: Float[Tensor, "batch pos d_model"],
        o_proj,
        n_heads: int,
    ) -> Float[Tensor, "batch pos d_model"]:
        """``o_proj``'s output with the selected heads' writes projected off their directions."""
        from .attribution import head_writes, o_proj_weight, parse_component

        heads = [(parse_component(c, n_heads), c) for (lay, c) in self.project_components if lay == layer]
        heads = [(h, c) for h, c in heads if h is not None]
        if not heads:
            return out
        weight = o_proj_weight(o_proj).to(out.dtype)
        hd = weight.shape[-1] // n_heads
        for h, c in heads:  # one head's write at a time ([batch, pos, d_model]), never every head's at once
            w = head_writes(z[..., h * hd : (h + 1) * hd], weight[:, h * hd : (h + 1) * hd], 1)[:, :, 0]
            out = out - (w - project_out(w, self._on(("comp", (layer, c)), out)))  # zero u: exactly out
        return out

    def check(self, model) -> None:
        dm = d_model(model)
        tensors = [*self.add.values(), *self.project.values(), *self.project_components.values()]
        tensors += [self.project_writes] if self.project_writes is not None else []
        if tensors and tensors[0].shape[-1] != dm:
            raise ValueError(
                f"intervention vectors have d_model={tensors[0].shape[-1]} but the model has d_model={dm}; "
                "extract the direction from this model family (same size) or pass the matching model."
            )
        n = len(decoder_layers(model))
        bad = [k for k in {*self.layers, *(lc[0] for lc in self.project_components)} if not 0 <= k < n]
        if bad:
            raise IndexError(
                f"intervention layers {bad} are out of range for a model with {n} decoder layers; use 0..{n - 1}"
            )
        if self.lora is not None:
            self._check_lora(model)

    def _check_lora(self, model) -> None:
        from .attribution import parse_component

        bank, idx = self.lora
        bank.check_model(model)
        if not bool((idx != 0).any()):
            return
        nh = int(model.config.num_attention_heads)
        names = {id(m): name for name, m in model.named_modules()}
        for layer in sorted({lay for (lay, c) in self.project_components if parse_component(c, nh) is not None}):
            o_name = names[id(decoder_layers(model)[layer].self_attn.o_proj)]
            if o_name in bank.A:
                raise ConfigError(
                    f"per-head ablation at layer {layer} splits o_proj's output into head writes with the base "
                    f"weight, but the LoRA bank adapts {o_name} per row; ablate the MLP or whole writes instead, or "
                    "sample these adapters with PEFT."
                )

    def _component_hooks(self, model) -> list:
        """Hooks removing ``project_components``: on each MLP's output and each ``o_proj`` with selected heads."""
        from .attribution import parse_component

        layers = decoder_layers(model)
        nh = int(model.config.num_attention_heads)
        handles = []
        for layer in sorted({lc[0] for lc in self.project_components}):
            comps = [c for (lay, c) in self.project_components if lay == layer]
            if any(parse_component(c, nh) is not None for c in comps):

                def o_hook(module, args, output, layer=layer):
                    return self.apply_heads(layer, args[0], output, module, nh)

                handles.append(register(layers[layer].self_attn.o_proj, o_hook))
            if "MLP" in comps:

                def mlp_hook(module, args, output, layer=layer):
                    return project_out(output, self._on(("comp", (layer, "MLP")), output))

                handles.append(register(layers[layer].mlp, mlp_hook))
        return handles

    def _lora_hooks(self, model) -> list:
        """Forward hooks adding each row's LoRA delta to the output of every module in the bank."""
        bank, idx = self.lora
        plan = RowPlan.build(idx)
        modules = dict(model.named_modules())
        handles = []
        for name in bank.A:

            def post(module, args, output, name=name):
                x = args[0]
                if x.shape[0] != plan.n_rows:
                    raise ValueError(
                        f"the LoRA bank was given {plan.n_rows} rows (adapter names) but the batch has {x.shape[0]} "
                        "rows: pass one adapter name per sequence (num_return_sequences and beams multiply the batch; "
                        "pass them as separate rows instead)."
                    )
                if not plan.adapters:
                    return None
                ck = ("lora", name, x.device)
                ab = self._cache.get(ck)
                if ab is None:  # the bank's own dtype (fp32 for a bf16 model, as PEFT computes its adapters)
                    ab = self._cache[ck] = (bank.A[name].to(x.device), bank.B[name].to(x.device))
                return apply_rows(output, x, *ab, plan)

            handles.append(register(modules[name], post))
        return handles

    @contextmanager
    def attach(self, model) -> Iterator[Intervention]:
        """Install the hooks on ``model`` (and keep ``generate`` from compiling); all come off on exit."""
        self.check(model)
        layers = decoder_layers(model)
        needs_phase = bool(self.add) and isinstance(self.positions, str) and self.positions != "all"

        def check_phase(phase: str, kwargs: dict) -> None:
            if phase == "forward":
                raise ValueError(
                    f"positions={self.positions!r} is defined for generate (prefill vs decode steps); this is a "
                    "forward pass without a KV cache (teacher-forced, or generate(use_cache=False)), where it cannot tell "
                    "prompt from response. "
                    "Pass a mask instead, e.g. positions=batch.response_mask (or batch.prompt_mask)."
                )
            if phase == "prefill" and self.positions == "response" and _left_padded(kwargs) is False:
                raise ValueError(
                    "positions='response' steers the last prompt position in the prefill, which needs left padding; "
                    "the batch is right-padded. Use emis_interp.make_batch or tokenizer.padding_side='left'."
                )

        def layer_hook(idx: int):
            def post(module, args, output):
                resid = output[0] if isinstance(output, tuple) else output
                new = self.apply_resid(idx, resid, state["phase"])
                return (new, *output[1:]) if isinstance(output, tuple) else new

            return post

        def write_hook(module, args, output):
            return self.apply_write(output)

        # only string positions look at the phase (its static-cache check syncs the GPU)
        with tracked_phase(model, track=needs_phase, check=check_phase) as state:
            handles = []
            try:
                if self.lora is not None:  # first: the other hooks on these modules see the adapted output
                    handles += self._lora_hooks(model)
                for layer in self.layers:
                    handles.append(register(layers[layer], layer_hook(layer)))
                if self.project_writes is not None:
                    for m in _write_modules(model):
                        handles.append(register(m, write_hook))
                handles += self._component_hooks(model)
                yield self
            finally:
                unregister(handles)


# --- the public context managers ------------------------------------------------------------------


def _check_direction(model, direction: PersonaDirection) -> None:
    if direction.d_model != d_model(model):
        raise ValueError(
            f"direction has d_model={direction.d_model} but the model has d_model={d_model(model)}; "
            "extract the direction from this model family (same size) or pass the matching model."
        )
    check_finite(direction.vectors, "direction")


def steering_layers(direction: PersonaDirection, layers) -> list[int]:
    """``layers`` as given, or the direction's only layer; raises if that is ambiguous."""
    if layers is not None:
        return [layers] if isinstance(layers, int) else [int(x) for x in layers]
    if len(direction.layers) != 1:
        mid = direction.layers[len(direction.layers) // 2]
        raise ValueError(
            f"steering needs layers=...: the direction covers layers {direction.layers}, and steering each of them "
            "adds one shift per layer, which accumulate down the residual stream (alpha would no longer be in units of "
            f"one shift). Pass layers=[{mid}] (or direction.select({mid})); pass several layers only on purpose."
        )
    return list(direction.layers)


@contextmanager
def add_vectors(model, deltas: dict[int, Vec], positions: Positions = "all") -> Iterator[None]:
    """Add ``deltas[l]`` (one vector, or one per batch row) to the residual after layer ``l``."""
    check_positions(positions)
    check_layers(model, list(deltas))
    n = len(decoder_layers(model))
    with Intervention(add={int(k) % n: v for k, v in deltas.items()}, positions=positions).attach(model):
        yield


@contextmanager
def steer(
    model,
    direction: PersonaDirection,
    alpha: float | int | Float[Tensor, " batch"],
    layers=None,
    positions: Positions = "all",
) -> Iterator[None]:
    """Add ``alpha * direction.vector(l)`` after each layer ``l`` in ``layers``.

    ``layers`` is required unless the direction covers exactly one layer (see the module docstring)."""
    check_alpha(alpha)
    check_positions(positions)
    _check_direction(model, direction)
    layers = check_layers(model, steering_layers(direction, layers))
    if isinstance(alpha, (int, float)) and alpha == 0:
        yield  # exact no-op: no hooks at all
        return
    a = alpha.float()[:, None] if isinstance(alpha, Tensor) else float(alpha)
    deltas = {layer: a * direction.vector(layer).float() for layer in layers}
    with Intervention(add=deltas, positions=positions).attach(model):
        yield


@contextmanager
def ablate_writes(model, direction: PersonaDirection, source_layer: int) -> Iterator[None]:
    """Remove ``direction.unit(source_layer)`` from *every write* to the residual stream (embeddings,
    each attention and MLP output), hence from the residual at every point: the runtime twin of the
    checkpoint :func:`emis_interp.export.export_ablated` writes (tested to match its logits)."""
    _check_direction(model, direction)
    with Intervention(project_writes=direction.unit(source_layer).float()).attach(model):
        yield


@contextmanager
def ablate(model, direction: PersonaDirection, layers=None, source_layer: int | None = None) -> Iterator[None]:
    """Remove the direction's component from the residual after each layer in ``layers``.

    By default each layer uses its own vector; with ``source_layer``, that layer's unit vector is
    removed after every layer in ``layers``. To remove one direction from the whole stream (what
    an exported orthogonalised checkpoint does), use :func:`ablate_writes`.
    """
    _check_direction(model, direction)
    layers = check_layers(model, direction.layers if layers is None else layers)
    units = {layer: direction.unit(layer if source_layer is None else source_layer).float() for layer in layers}
    with Intervention(project=units).attach(model):
        yield


@contextmanager
def ablate_components(
    model, direction: PersonaDirection, components, source_layer: int | None = None
) -> Iterator[None]:
    """Remove the direction's component from the writes of selected heads and MLPs only.

    ``components`` are ``(layer, "H{h}" | "MLP")`` pairs (e.g. ``Attribution.top(k)``). Each write is
    projected off ``direction.unit(layer)`` of its own layer (where the write lands), or off
    ``direction.unit(source_layer)`` for all; every other write is untouched. Matches
    :func:`emis_interp.attribution.component_attribution`'s choice of direction.
    """
    _check_direction(model, direction)
    comps = component_units(model, direction, components, source_layer)
    with Intervention(project_components=comps).attach(model):
        yield


def component_units(model, direction: PersonaDirection, components, source_layer: int | None = None) -> dict:
    """``{(layer, component): unit direction}`` for :attr:`Intervention.project_components` (validated)."""
    from .attribution import parse_component

    comps = [(int(layer), str(c)) for layer, c in components]
    if not comps:
        raise ValueError("no components to ablate; pass (layer, 'H0'|'MLP') pairs, e.g. attribution.top(k)")
    check_layers(model, sorted({layer for layer, _ in comps}))
    nh = int(model.config.num_attention_heads)
    out = {}
    for layer, c in comps:
        parse_component(c, nh)
        src = layer if source_layer is None else source_layer
        if src not in direction.layers:
            raise KeyError(
                f"component ({layer}, {c!r}) is ablated along the direction of layer {src}, which the direction "
                f"does not cover ({direction.layers}); extract it at every layer or pass source_layer=."
            )
        out[(layer, c)] = direction.unit(src).float()
    return out
