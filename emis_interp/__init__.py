"""emis_interp: persona vectors in emergent misalignment, for Qwen2.5 models.

Layer ``l`` is the residual stream after decoder layer ``l`` (HF ``hidden_states[l+1]``, TL
``blocks.{l}.hook_resid_post``); steering ``alpha`` multiplies the direction's vector: raw units, or units
of the layer's typical residual norm after :func:`in_norm_units` (see :mod:`emis_interp.directions`).
"""

from .manifest import snapshot_sources

# first: the package's source is read now, and every module of it runs that source when imported (see manifest)
snapshot_sources(__name__)

from .capture import Activations, TokenActivations, capture
from .conversations import Batch, Conversation, load_jsonl, make_batch
from .directions import (
    PersonaDirection,
    in_norm_units,
    model_diff,
    rank_layers,
    residual_norms,
    response_contrast,
    system_prompt_contrast,
)
from .hooks import hook_name, residual_hooks
from .interventions import ablate, add_vectors, steer
from .models import check_layers, decoder_layers, load_model, load_tokenizer, model_fingerprint

__all__ = [
    "Activations",
    "Batch",
    "Conversation",
    "PersonaDirection",
    "TokenActivations",
    "ablate",
    "add_vectors",
    "capture",
    "check_layers",
    "decoder_layers",
    "hook_name",
    "in_norm_units",
    "load_jsonl",
    "load_model",
    "load_tokenizer",
    "make_batch",
    "model_diff",
    "model_fingerprint",
    "rank_layers",
    "residual_hooks",
    "residual_norms",
    "response_contrast",
    "steer",
    "system_prompt_contrast",
]
