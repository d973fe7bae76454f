"""PEFT LoRA adapters on disk: their factors and PEFT's scaling rule, read without loading a model.

One implementation of PEFT's scaling for both readers of adapters (:mod:`emis_interp.weights`'s
weight-space dynamics and :class:`emis_interp.lora_bank.LoraBank`): ``s = lora_alpha / r``, or
``lora_alpha / sqrt(r)`` with rsLoRA, where ``r`` and ``lora_alpha`` come from ``rank_pattern`` and
``alpha_pattern`` when a key matches the module as PEFT matches it (``peft.utils.other.get_pattern_key``:
the first key with ``re.match(rf"(.*\.)?({key})$", module)``), else from ``r`` and ``lora_alpha``
(PEFT's defaults: 8 and 8).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

from jaxtyping import Float
from safetensors.torch import load_file
from torch import Tensor

from .errors import ConfigError

_KEY_RE = re.compile(r"^(?P<module>.+)\.lora_(?P<ab>A|B|embedding_A|embedding_B)(?:\.[^.]+)?(?:\.weight)?$")


def _pattern_value(patterns: dict | None, module: str, default):
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def lora_scaling(cfg: dict, module: str) -> float:
    """PEFT's scaling of ``module`` under the adapter config ``cfg`` (see the module docstring)."""
    r = _pattern_value(cfg.get("rank_pattern"), module, cfg.get("r", 8))
    alpha = _pattern_value(cfg.get("alpha_pattern"), module, cfg.get("lora_alpha", 8))
    return alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r


def adapter_scaling(path: str | Path, module: str) -> float:
    """:func:`lora_scaling` of ``module`` (its name without PEFT's ``base_model.model.`` prefix) under the
    ``adapter_config.json`` in ``path`` (1.0 without one), as :func:`read_adapter` computes it."""
    cfg_path = Path(path) / "adapter_config.json"
    return lora_scaling(json.loads(cfg_path.read_text()), module) if cfg_path.exists() else 1.0


def _adapter_file(path: Path) -> Path:
    f = path / "adapter_model.safetensors"
    if not f.exists():
        raise FileNotFoundError(
            f"no adapter_model.safetensors in {path}; this needs a LoRA checkpoint "
            "(PEFT checkpoints saved with save_pretrained / the Trainer)."
        )
    return f


def read_adapter(path: str | Path) -> dict[str, tuple[Float[Tensor, "r d_in"], Float[Tensor, "d_out r"], float]]:
    """``{module: (A [r, d_in], B [d_out, r], scaling)}`` from one checkpoint, fp32 on CPU; the scaling is
    :func:`lora_scaling` of its ``adapter_config.json`` (1.0 without one).

    Embedding LoRAs (``lora_embedding_A [r, vocab]``, ``lora_embedding_B [d, r]``) are read the same
    way (their ΔW is the transpose, with the same norms and inner products).
    """
    path = Path(path)
    sd = load_file(str(_adapter_file(path)))
    cfg_path = path / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text()) if cfg_path.exists() else None
    parts: dict[str, dict[str, Tensor]] = {}
    for key, t in sd.items():
        m = _KEY_RE.match(key)
        if m is None:
            continue
        parts.setdefault(m["module"], {})[m["ab"][-1]] = t.float()
    out = {}
    for mod in sorted(parts):
        p = parts[mod]
        if set(p) != {"A", "B"}:
            raise ConfigError(f"{path}: module {mod} has lora_{'A' if 'A' in p else 'B'} but not its pair.")
        a, b = p["A"], p["B"]
        if a.shape[0] != b.shape[1]:
            raise ConfigError(f"{path}: {mod} lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} ranks differ.")
        name = mod.removeprefix("base_model.model.")
        out[name] = (a, b, 1.0 if cfg is None else lora_scaling(cfg, name))
    if not out:
        raise ConfigError(f"{path}: adapter_model.safetensors holds no lora_A/lora_B tensors.")
    return out
