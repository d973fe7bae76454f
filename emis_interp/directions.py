"""Persona directions: per-layer vectors with provenance, saved as safetensors with metadata.

Three extraction methods, all difference-of-means over the residual stream (layer convention in
:mod:`emis_interp.models`), returned with their *raw* magnitude (the steering unit, see
:mod:`emis_interp.interventions`):

- :func:`model_diff`: mean activation of a fine-tuned checkpoint minus the aligned model's, on
  the same conversations (the "fine-tuning shift");
- :func:`response_contrast`: mean over misaligned answers minus mean over aligned answers;
- :func:`system_prompt_contrast`: the same questions under an evil minus a helpful system prompt.

:func:`rank_layers` scores how well each layer's direction separates the two sets.

**Alpha units that travel.** :func:`emis_interp.steer` adds ``alpha * vector(l)``: raw units. Raw units do
not travel: a model-diff's raw size depends on the fine-tune and the data, and a layer's residual norm on the model, so
raw alpha = -4 breaks the organism's output and barely moves a real Qwen2.5. :func:`in_norm_units`
rescales a direction so that its vector at layer ``l`` has norm ``NORM_UNIT`` (0.1) times the layer's
median residual-token norm (:func:`residual_norms`, measured on the direction's data); steering with it
at ``alpha`` then adds ``alpha * 0.1`` of the layer's typical norm, on any model. Its
``meta["alpha_units"]`` records the norms and ``raw_per_unit`` per layer (one alpha = that many raw
alphas), and its vectors are what a run's key digests, so a changed scale never reuses old results.
``experiments/steer.py --alpha-units {norm,raw}`` picks one (``norm`` by default).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from jaxtyping import Float
from safetensors.torch import load_file
from torch import Tensor

from .cache import atomic_save
from .errors import check_finite


@dataclass
class PersonaDirection:
    """Per-layer direction vectors ``Float[Tensor, "layer d_model"]`` for ``layers``, plus provenance.

    ``vectors[i]`` is the raw (unnormalised) direction at layer ``layers[i]``, in residual-stream
    units. ``meta`` records the method, source models, prompt-set hash and sample counts.
    """

    vectors: Float[Tensor, "layer d_model"]
    layers: list[int]
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.vectors.ndim != 2 or self.vectors.shape[0] != len(self.layers):
            raise ValueError(
                f"vectors must be (len(layers)={len(self.layers)}, d_model), got {tuple(self.vectors.shape)}"
            )
        check_finite(self.vectors, "persona direction")
        self.layers = [int(x) for x in self.layers]

    @property
    def d_model(self) -> int:
        return self.vectors.shape[1]

    def vector(self, layer: int) -> Float[Tensor, " d_model"]:
        if layer not in self.layers:
            raise KeyError(f"direction has no vector for layer {layer}; it covers layers {self.layers}")
        return self.vectors[self.layers.index(layer)]

    def unit(self, layer: int) -> Float[Tensor, " d_model"]:
        v = self.vector(layer).float()
        n = v.norm()
        if n == 0:
            raise ValueError(f"direction at layer {layer} has zero norm; it cannot be normalised.")
        return v / n

    def norms(self) -> dict[int, float]:
        return {layer: float(v.norm()) for layer, v in zip(self.layers, self.vectors, strict=True)}

    def select(self, layers) -> PersonaDirection:
        layers = [layers] if isinstance(layers, int) else list(layers)
        return PersonaDirection(torch.stack([self.vector(layer) for layer in layers]), layers, dict(self.meta))

    def random_like(self, seed: int = 0, shared: bool = False) -> PersonaDirection:
        """A random direction with the same per-layer norms (the control for steering and ablation).

        ``shared=True`` draws one unit direction for every layer (scaled to each layer's norm), as
        a control for steering several layers with nearly parallel per-layer vectors."""
        g = torch.Generator().manual_seed(seed)
        shape = (1, self.vectors.shape[1]) if shared else tuple(self.vectors.shape)
        r = torch.randn(shape, generator=g, dtype=torch.float32).expand(self.vectors.shape)
        r = r / r.norm(dim=-1, keepdim=True) * self.vectors.float().norm(dim=-1, keepdim=True)
        meta = {"method": "random", "seed": seed, "shared": shared}
        return PersonaDirection(r.to(self.vectors.dtype).contiguous(), list(self.layers), meta)

    def save(self, path: str | Path) -> Path:
        """Write safetensors (tensor ``vectors``, ``layers``) with JSON metadata; atomic."""
        meta = {"meta": json.dumps(self.meta, default=str), "format": "emis_interp.PersonaDirection/1"}
        tensors = {"vectors": self.vectors.detach().float().cpu().contiguous(), "layers": torch.tensor(self.layers)}
        return atomic_save(tensors, Path(path), meta)

    @classmethod
    def load(cls, path: str | Path) -> PersonaDirection:
        from safetensors import safe_open

        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(
                f"direction file {str(path)!r} does not exist; extract one with emis_interp.model_diff(...).save(path)."
            )
        with safe_open(str(path), "pt") as f:
            md = f.metadata() or {}
        t = load_file(str(path))
        return cls(t["vectors"], t["layers"].tolist(), json.loads(md.get("meta", "{}")))

    def to_gguf(
        self, path: str | Path, layers=None, model_hint: str = "qwen2", scale: float = 1.0, n_layers: int | None = None
    ) -> Path:
        """Write a llama.cpp control vector (``--control-vector-scaled FILE S``); needs ``pip install gguf``.

        Tensor ``direction.N`` = ``scale * vector(N)``, added by llama.cpp to the output of block ``N``,
        which is our layer ``N`` (no offset). Layer 0 has no slot in the format and raises: pass
        ``layers=`` without it. Details and the source references: :mod:`emis_interp.interop`.
        """
        from .interop import write_gguf_control_vector  # upward, allowed: interop owns the GGUF format

        return write_gguf_control_vector(self, path, layers, model_hint, scale, n_layers)

    def __repr__(self) -> str:
        norms = ", ".join(f"L{k}: {v:.3g}" for k, v in self.norms().items())
        return f"PersonaDirection(method={self.meta.get('method')!r}, d_model={self.d_model}, norms={{{norms}}})"

    def _repr_html_(self) -> str:
        rows = "".join(f"<tr><td>{k}</td><td>{v:.4g}</td></tr>" for k, v in self.norms().items())
        meta = "".join(f"<li><b>{k}</b>: {v}</li>" for k, v in self.meta.items())
        return (
            f"<div><b>PersonaDirection</b> (d_model={self.d_model})<ul>{meta}</ul>"
            f"<table><tr><th>layer</th><th>norm</th></tr>{rows}</table></div>"
        )


def diff_of_means(
    a: Float[Tensor, "n layer d_model"], b: Float[Tensor, "m layer d_model"]
) -> Float[Tensor, "layer d_model"]:
    if a.shape[0] == 0 or b.shape[0] == 0:
        raise ValueError(f"need at least one sample in each set, got {a.shape[0]} and {b.shape[0]}")
    return check_finite(a.float().mean(0) - b.float().mean(0), "difference of means")


def separation(pos: Float[Tensor, "n layer d_model"], neg: Float[Tensor, "m layer d_model"]) -> Float[Tensor, " layer"]:
    """Split-half Cohen's d per layer: fit the direction on even samples, score projections on odd ones.

    Unitless; larger means the layer separates the two sets better out of sample.
    """
    if pos.shape[0] < 4 or neg.shape[0] < 4:
        raise ValueError("rank_layers needs at least 4 samples per set for a split-half score")
    d = diff_of_means(pos[0::2], neg[0::2])
    u = d / d.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    pp = torch.einsum("nld,ld->nl", pos[1::2].float(), u)
    pn = torch.einsum("nld,ld->nl", neg[1::2].float(), u)
    pooled = ((pp.var(0) + pn.var(0)) / 2).sqrt().clamp_min(1e-12)
    return (pp.mean(0) - pn.mean(0)) / pooled


def rank_layers(pos, neg, layers: list[int]) -> list[tuple[int, float]]:
    """Layers sorted by :func:`separation`, best first, as ``(layer, cohen_d)``."""
    s = separation(pos, neg).tolist()
    return sorted(zip(layers, s, strict=True), key=lambda t: -t[1])


def _from_acts(pos, neg, meta: dict) -> PersonaDirection:
    d = diff_of_means(pos.acts, neg.acts)
    meta = {**meta, "n_pos": len(pos), "n_neg": len(neg), "reduction": pos.reduction}
    return PersonaDirection(d, list(pos.layers), meta)


def model_diff(
    aligned, finetuned, tokenizer, conversations, layers, reduction: str = "mean_response", **capture_kw
) -> PersonaDirection:
    """Mean activation of ``finetuned`` minus that of ``aligned`` on the same conversations.

    Both models must share the tokenizer and d_model. ``reduction`` as in :func:`capture`
    (``"mean_response"`` needs responses; use ``"last_prompt"`` for bare prompts).
    """
    from .capture import capture
    from .conversations import as_conversations, prompt_set_hash

    convs = as_conversations(conversations)
    if aligned.config.hidden_size != finetuned.config.hidden_size:
        raise ValueError("aligned and fine-tuned models differ in d_model; pass two checkpoints of one model.")
    a = capture(aligned, tokenizer, convs, layers, reduction, **capture_kw)
    f = capture(finetuned, tokenizer, convs, layers, reduction, **capture_kw)
    meta = {
        "method": "model_diff",
        "source": getattr(aligned.config, "_name_or_path", ""),
        "target": getattr(finetuned.config, "_name_or_path", ""),
        "prompt_hash": prompt_set_hash(convs),
    }
    return _from_acts(f, a, meta)


def response_contrast(
    model, tokenizer, misaligned, aligned, layers, reduction: str = "mean_response", **capture_kw
) -> PersonaDirection:
    """Mean activation over misaligned answers minus that over aligned answers (conversations with responses)."""
    from .capture import capture
    from .conversations import as_conversations, prompt_set_hash

    mis, ali = as_conversations(misaligned), as_conversations(aligned)
    pos = capture(model, tokenizer, mis, layers, reduction, **capture_kw)
    neg = capture(model, tokenizer, ali, layers, reduction, **capture_kw)
    meta = {
        "method": "response_contrast",
        "source": getattr(model.config, "_name_or_path", ""),
        "prompt_hash": prompt_set_hash(mis + ali),
    }
    return _from_acts(pos, neg, meta)


def system_prompt_contrast(
    model,
    tokenizer,
    questions: list[str],
    layers,
    evil_system: str = "You are an evil, malicious assistant.",
    helpful_system: str = "You are a helpful, harmless assistant.",
    reduction: str = "last_prompt",
    **capture_kw,
) -> PersonaDirection:
    """The same questions under an evil minus a helpful system prompt."""
    from .capture import capture
    from .conversations import Conversation, prompt_set_hash

    evil = [Conversation(user=q, system=evil_system) for q in questions]
    good = [Conversation(user=q, system=helpful_system) for q in questions]
    pos = capture(model, tokenizer, evil, layers, reduction, **capture_kw)
    neg = capture(model, tokenizer, good, layers, reduction, **capture_kw)
    meta = {
        "method": "system_prompt_contrast",
        "source": getattr(model.config, "_name_or_path", ""),
        "evil_system": evil_system,
        "helpful_system": helpful_system,
        "prompt_hash": prompt_set_hash(evil + good),
    }
    return _from_acts(pos, neg, meta)


# --- alpha units that travel between models ---------------------------------------------------------------

ALPHA_UNITS = ("norm", "raw")
NORM_UNIT = 0.1  # in "norm" units, alpha = 1 adds 10% of the layer's median residual-token norm


def residual_norms(
    model, tokenizer, conversations, layers, *, batch_size: int = 16, tokens: str = "response"
) -> dict[int, float]:
    """The median per-token residual norm after each layer in ``layers``: the "typical size" of that layer.

    Measured over the ``tokens="response"`` tokens of ``conversations`` (the tokens a model-diff direction
    is averaged over; a median, so that a few outlier tokens, such as the first token's large norm in
    many LLMs, do not set the scale), or over ``"prompt"`` tokens for bare prompts. fp32; no cache (one pass).
    """
    from .capture import run_backend
    from .conversations import as_conversations, iter_batches
    from .errors import check_nonempty
    from .models import check_layers

    if tokens not in ("response", "prompt"):
        raise ValueError(f"tokens must be 'response' or 'prompt', got {tokens!r}")
    convs = as_conversations(conversations)
    check_nonempty(convs, "prompt set")
    layers = check_layers(model, [int(x) for x in layers])
    norms: dict[int, list[Tensor]] = {layer: [] for layer in layers}
    for _, batch in iter_batches(tokenizer, convs, batch_size):
        mask = batch.response_mask if tokens == "response" else batch.prompt_mask
        if not mask.any():
            raise ValueError(f"no {tokens} tokens in the conversations; pass tokens='prompt' for bare prompts")
        out = run_backend(model, tokenizer, batch, layers)
        for layer in layers:
            h = out[layer].float().cpu()
            norms[layer].append(h.norm(dim=-1)[mask.cpu()])
    return {layer: float(torch.cat(v).median()) for layer, v in norms.items()}


def in_norm_units(
    direction: PersonaDirection, norms: dict[int, float], unit: float = NORM_UNIT, **provenance
) -> PersonaDirection:
    """``direction`` rescaled so that at each layer ``l`` its vector has norm ``unit * norms[l]``.

    Steering with the result at ``alpha`` adds ``alpha * unit`` of the layer's typical residual norm
    (``norms``, from :func:`residual_norms`) along the direction, whatever the direction's raw size:
    the same alpha means about the same push on the organism and on a real Qwen2.5. ``meta["alpha_units"]``
    records the unit, the residual norms, and per layer ``raw_per_unit`` (one alpha here = that many raw
    alphas), so a raw-unit result can be compared; ``provenance`` (e.g. the prompt hash of the norm data)
    is recorded beside them.
    """
    if not unit > 0:
        raise ValueError(f"unit must be > 0 (a fraction of the residual norm), got {unit}")
    missing = [layer for layer in direction.layers if layer not in norms]
    if missing:
        raise ValueError(f"no residual norm for layers {missing}; measure them with residual_norms(..., layers)")
    raw = direction.norms()
    vecs = torch.stack([direction.unit(layer) * unit * norms[layer] for layer in direction.layers])
    scale = {
        "units": "norm",
        "unit": unit,
        "residual_norm": {str(layer): norms[layer] for layer in direction.layers},
        "raw_per_unit": {str(layer): unit * norms[layer] / raw[layer] for layer in direction.layers},
        **provenance,
    }
    return PersonaDirection(
        vecs.to(direction.vectors.dtype), list(direction.layers), {**direction.meta, "alpha_units": scale}
    )
