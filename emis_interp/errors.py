"""Exceptions and input checks shared by every module. Each message says what is wrong and how to fix it."""

from __future__ import annotations

import math

import torch


class ConfigError(ValueError):
    """A model, adapter, checkpoint or option that does not fit what was asked."""


def check_finite(x: torch.Tensor, what: str) -> torch.Tensor:
    """Raise if ``x`` holds NaN or Inf (e.g. activations of a diverged fp16 run, or a corrupt direction)."""
    if not torch.isfinite(x).all():
        bad = (~torch.isfinite(x)).sum().item()
        raise FloatingPointError(
            f"{what} contains {bad} NaN/Inf values. Check the model's dtype (use bf16 or fp32, not fp16) "
            "and the inputs, or recompute the direction."
        )
    return x


def check_alpha(alpha) -> None:
    vals = alpha.flatten().tolist() if isinstance(alpha, torch.Tensor) else [alpha]
    for a in vals:
        if not isinstance(a, (int, float)) or not math.isfinite(a):
            raise ValueError(f"alpha must be a finite number, got {a!r}; pass e.g. --alpha -4.")


def check_nonempty(items, what: str) -> None:
    if len(items) == 0:
        raise ValueError(f"{what} is empty; pass at least one conversation (check the file path and filters).")
