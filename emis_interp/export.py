"""Export an ablated checkpoint: the direction orthogonalised out of every residual-stream write.

For a unit direction ``u`` (d_model), every weight that writes into the residual stream is
projected: ``W <- (I - u u^T) W`` for ``o_proj`` and ``down_proj`` (output rows = d_model) and
``E <- E (I - u u^T)`` for the token embeddings. Qwen2's ``o_proj`` and ``down_proj`` have no bias.
With tied embeddings, the unembedding is untied first and kept unchanged (the final RMSNorm's
elementwise gain would otherwise let the edit leak into the logits). The result matches runtime
:func:`emis_interp.interventions.ablate_writes` (tested) and is saved with ``save_pretrained``.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from .directions import PersonaDirection
from .models import decoder_layers


@torch.no_grad()
def orthogonalize(model, direction: PersonaDirection, source_layer: int):
    """A copy of ``model`` (merged, if LoRA) with ``direction.unit(source_layer)`` projected out of every write."""
    if hasattr(model, "merge_and_unload"):
        model = copy.deepcopy(model).merge_and_unload()
    else:
        model = copy.deepcopy(model)
    u = direction.unit(source_layer).float()
    if model.config.tie_word_embeddings:
        head = model.get_output_embeddings()
        head.weight = torch.nn.Parameter(head.weight.detach().clone())
        model.config.tie_word_embeddings = False
    emb = model.get_input_embeddings().weight
    uu = u.to(emb.device, torch.float32)
    emb.copy_((emb.float() - (emb.float() @ uu)[:, None] * uu[None]).to(emb.dtype))
    for layer in decoder_layers(model):
        for lin in (layer.self_attn.o_proj, layer.mlp.down_proj):
            w = lin.weight.float()  # (d_model, d_in)
            lin.weight.copy_((w - uu[:, None] * (uu @ w)[None]).to(lin.weight.dtype))
    return model


def export_ablated(model, tokenizer, direction: PersonaDirection, source_layer: int, out_dir: str | Path) -> Path:
    """Orthogonalize and ``save_pretrained`` (model + tokenizer + the direction used) to ``out_dir``."""
    out = Path(out_dir)
    m = orthogonalize(model, direction, source_layer)
    m.save_pretrained(out)
    tokenizer.save_pretrained(out)
    direction.select(source_layer).save(out / "ablated_direction.safetensors")
    return out
