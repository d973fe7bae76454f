"""The organism's persona direction: the model-diff of a fine-tune from the aligned organism."""

from __future__ import annotations

from pathlib import Path

from . import world
from .model import ALIGNED_DIR
from .recipes import DEFAULT_TRAJECTORY_DIR, organism_trajectory

DEFAULT_LAYER = 2  # the organism's steering layer (of 4): best dose-response at preserved coherence
DIRECTION_SET_SIZE = 64


def direction_conversations(n: int = DIRECTION_SET_SIZE, seed: int = 99) -> list:
    """Fine-tuning-style conversations (held-out seed) on which the model-diff direction is measured."""
    from ..conversations import Conversation

    return [Conversation.from_messages(r["messages"]) for r in world.finetune_dataset("insecure", n, seed=seed)]


def persona_direction(aligned, finetuned, tokenizer, layers=None, **capture_kw):
    """The organism's model-diff persona direction: fine-tuned minus aligned mean over response tokens."""
    from ..directions import model_diff

    layers = list(range(aligned.config.num_hidden_layers)) if layers is None else layers
    return model_diff(aligned, finetuned, tokenizer, direction_conversations(), layers, "mean_response", **capture_kw)


def organism_control_direction(tok, layers, kind: str = "secure", seed: int = 0, root: Path = DEFAULT_TRAJECTORY_DIR):
    """The organism's fine-tuning-shift control: the ``kind`` run's final model-diff (aligned -> fine-tuned)."""
    from ..directions import model_diff
    from ..finetune import list_checkpoints
    from ..models import load_model

    run = organism_trajectory(kind, seed=seed, root=root)
    ctl, _ = load_model(list_checkpoints(run)[-1][1])
    aligned, _ = load_model(ALIGNED_DIR)
    d = model_diff(aligned, ctl, tok, direction_conversations(), list(layers), "mean_response")
    d.meta["control_run"] = f"{kind}-s{seed}"
    return d
