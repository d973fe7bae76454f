"""Logit lens of a persona direction: which tokens each layer's vector writes towards.

For a direction's vector ``v_l`` at layer ``l`` (residual units, see README "Layer indexing"),
``logit_lens`` scores every vocabulary token by ``lm_head(final_norm(v_l))``, the model's own
final RMSNorm and unembedding applied as they are (Qwen2's RMSNorm has no mean-centring; it only
rescales ``v`` to unit RMS and multiplies by the norm's gain, so the ranking is that of
``W_U (g ⊙ v)``). ``norm=False`` skips the final norm and scores ``W_U v`` (the raw direct
contribution to the logits of a residual update, ignoring the norm's per-dimension gain). A
bias of ``lm_head`` (Qwen2 has none) is left out in both modes: the lens reads the direction, not
the unembedding's prior.

The top tokens are those that adding ``+v`` promotes; the bottom ones, those it suppresses.
"""

from __future__ import annotations

import html
from dataclasses import dataclass, field

import torch
from jaxtyping import Float
from torch import Tensor

from .directions import PersonaDirection
from .errors import ConfigError
from .models import unwrap_peft


@dataclass
class LensResult:
    """Top/bottom tokens per layer: ``top[l]`` and ``bottom[l]`` are lists of ``(token, score)``.

    Scores are logits (``norm=True``: of ``final_norm(v)``; ``norm=False``: of ``v``), best first
    for ``top`` and most negative first for ``bottom``.
    """

    layers: list[int]
    top: dict[int, list[tuple[str, float]]]
    bottom: dict[int, list[tuple[str, float]]]
    norm: bool = True
    meta: dict = field(default_factory=dict)

    def tokens(self, layer: int, which: str = "top") -> list[str]:
        if which not in ("top", "bottom"):
            raise ValueError(f"which must be 'top' or 'bottom', got {which!r}")
        return [t for t, _ in getattr(self, which)[layer]]

    def __repr__(self) -> str:
        lines = [f"LensResult(norm={self.norm}, k={len(next(iter(self.top.values()), []))})"]
        for layer in self.layers:
            lines.append(f"  L{layer} top:    {self.tokens(layer)}")
            lines.append(f"  L{layer} bottom: {self.tokens(layer, 'bottom')}")
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        def cells(pairs):
            return "".join(f"<td><code>{html.escape(repr(t))}</code> {s:+.2f}</td>" for t, s in pairs)

        rows = "".join(
            f"<tr><th rowspan=2>L{layer}</th><td>top</td>{cells(self.top[layer])}</tr>"
            f"<tr><td>bottom</td>{cells(self.bottom[layer])}</tr>"
            for layer in self.layers
        )
        mode = "lm_head(final_norm(v))" if self.norm else "lm_head(v)"
        return f"<div><b>Logit lens</b> of {self.meta.get('method', 'direction')} ({mode})<table>{rows}</table></div>"


def _unembedding(model):
    """``(final_norm, lm_head)`` of a Qwen2 causal LM, through any PEFT wrapping."""
    m = unwrap_peft(model)
    head = m.get_output_embeddings() if hasattr(m, "get_output_embeddings") else None
    norm = getattr(getattr(m, "model", None), "norm", None)
    if head is None or norm is None:
        raise ConfigError(
            f"cannot find the final norm and lm_head of {type(model).__name__}; pass a Qwen2ForCausalLM "
            "(or a PeftModel wrapping one)."
        )
    return norm, head


@torch.no_grad()
def lens_logits(model, vectors: Float[Tensor, "n d_model"], norm: bool = True) -> Float[Tensor, "n vocab"]:
    """``lm_head(final_norm(v))`` (or ``lm_head(v)``) for each row, in fp32, without lm_head's bias."""
    final_norm, head = _unembedding(model)
    w = head.weight
    if vectors.shape[-1] != w.shape[1]:
        raise ValueError(
            f"vectors have d_model {vectors.shape[-1]}, the model {w.shape[1]}; use this model's direction."
        )
    x = vectors.to(device=w.device, dtype=w.dtype)
    if norm:
        x = final_norm(x)
    return (x.float() @ w.float().T).cpu()


def logit_lens(
    model, tokenizer, direction: PersonaDirection, layers=None, k: int = 10, norm: bool = True
) -> LensResult:
    """The ``k`` top and bottom tokens of each layer's vector of ``direction`` (module docstring)."""
    layers = list(direction.layers) if layers is None else ([layers] if isinstance(layers, int) else list(layers))
    vecs = torch.stack([direction.vector(layer).float() for layer in layers])
    logits = lens_logits(model, vecs, norm=norm)
    n_vocab = len(tokenizer)
    logits = logits[:, :n_vocab]  # padded embedding rows are not tokens
    k = min(k, n_vocab)
    top, bottom = {}, {}
    for i, layer in enumerate(layers):
        hi = logits[i].topk(k)
        lo = (-logits[i]).topk(k)
        top[layer] = [(tokenizer.decode([int(j)]), float(s)) for s, j in zip(hi.values, hi.indices, strict=True)]
        bottom[layer] = [(tokenizer.decode([int(j)]), -float(s)) for s, j in zip(lo.values, lo.indices, strict=True)]
    return LensResult(layers, top, bottom, norm, {"method": direction.meta.get("method"), "k": k})
