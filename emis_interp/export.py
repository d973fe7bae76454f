"""Export an ablated checkpoint: one direction orthogonalised out of every residual-stream write.

For a unit direction ``u`` (d_model), every weight that writes into the residual stream is
projected with :func:`emis_interp.interventions.project_out`: ``W <- (I - u u^T) W`` for
``o_proj`` and ``down_proj`` (output rows = d_model; a bias, if any, likewise) and
``E <- E (I - u u^T)`` for the token embeddings. With tied embeddings, the unembedding is untied
and kept unchanged (the final RMSNorm's elementwise gain would otherwise let the edit leak into
the logits). Since the stream is the sum of these writes, no residual anywhere has a component
along ``u``: the checkpoint computes exactly what runtime
:func:`emis_interp.interventions.ablate_writes` (and ``Condition(kind="ablate_writes")``) does
(tested at every source layer, fp32, and through LoRA).

Memory: nothing is deep-copied. Tensors are streamed from the model's state dict module by
module (LoRA deltas merged per module), edited copies are made only for the written weights, and
they go to disk in safetensors shards in the ``save_pretrained`` layout (``model.safetensors`` or
``model-0000k-of-0000n.safetensors`` + index), so at most one shard is held besides the model.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import Tensor

from .directions import PersonaDirection
from .interventions import _write_modules, project_out
from .models import unwrap_peft

SHARD_BYTES = 2 * 1024**3


def _lora_delta(module) -> Tensor | None:
    """The summed weight delta of ``module``'s active, unmerged LoRA adapters (None if it has none)."""
    if not hasattr(module, "get_delta_weight") or getattr(module, "disable_adapters", False):
        return None
    merged = set(getattr(module, "merged_adapters", []))
    delta = None
    for name in module.active_adapters:
        has = name in getattr(module, "lora_A", {}) or name in getattr(module, "lora_embedding_A", {})
        if name in merged or not has:
            continue
        if getattr(module, "use_dora", {}).get(name, False):
            raise NotImplementedError("exporting a DoRA adapter is not supported; merge_and_unload it first")
        d = module.get_delta_weight(name).float()
        delta = d if delta is None else delta + d
    return delta


@torch.no_grad()
def ablated_tensors(model, u: Tensor) -> Iterator[tuple[str, Tensor]]:
    """``(name, tensor)`` of the orthogonalised, LoRA-merged checkpoint, in ``save_pretrained`` naming.

    Unedited tensors are the model's own (no copy); each written weight is edited in float32 one
    module at a time and cast back to its dtype.
    """
    base = unwrap_peft(model)
    modules = dict(base.named_modules())
    writers = {id(m) for m in _write_modules(model)}
    tied = bool(getattr(base.config, "tie_word_embeddings", False))
    emb = base.get_input_embeddings()
    done: set[str] = set()
    for key, t in base.state_dict().items():
        if ".original_module." in key or ".modules_to_save." in key:
            raise NotImplementedError(
                f"the adapter trains {key.split('.original_module.')[0].split('.modules_to_save.')[0]!r} fully "
                "(PEFT modules_to_save); export does not merge those. Merge the adapter first "
                "(model.merge_and_unload(), then save_pretrained) and export the merged model."
            )
        if ".lora_" in key:
            continue
        mod_name, _, pname = key.rpartition(".")
        owner_name = mod_name.removesuffix(".base_layer")
        owner = modules[owner_name]
        out_key = f"{owner_name}.{pname}"
        if out_key in done:
            continue
        done.add(out_key)
        delta = _lora_delta(owner) if (pname == "weight" and owner_name != mod_name) else None
        edit = id(owner) in writers and pname in ("weight", "bias")
        if delta is not None or edit:
            w = t.float() if delta is None else t.float() + delta.to(t.device)
            if edit:
                uu = u.to(w.device, torch.float32)
                # embedding rows and biases are d_model vectors; o_proj/down_proj columns write d_model vectors
                w = project_out(w, uu) if (owner is emb or pname == "bias") else project_out(w.T, uu).T
            t = w.to(t.dtype).contiguous()
        yield out_key, t
    if tied and "lm_head.weight" not in done:  # untie: the head keeps the unedited (base) embedding weight
        yield "lm_head.weight", base.get_output_embeddings().weight.detach()


def _save_shards(items: Iterator[tuple[str, Tensor]], out: Path, shard_bytes: int) -> None:
    from safetensors.torch import save_file

    shards: list[list[str]] = []
    total = 0
    shard: dict[str, Tensor] = {}
    size = 0

    def flush():
        nonlocal shard, size
        if shard:
            shards.append(list(shard))
            save_file(shard, str(out / f"shard-{len(shards)}.tmp"), metadata={"format": "pt"})
        shard, size = {}, 0

    for name, t in items:
        t = t.detach().to("cpu").contiguous()
        nb = t.numel() * t.element_size()
        if shard and size + nb > shard_bytes:
            flush()
        shard[name] = t
        size += nb
        total += nb
    flush()
    if len(shards) == 1:
        (out / "shard-1.tmp").rename(out / "model.safetensors")
        return
    weight_map = {}
    for i, names in enumerate(shards, 1):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        (out / f"shard-{i}.tmp").rename(out / fname)
        weight_map.update(dict.fromkeys(names, fname))
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def export_ablated(
    model,
    tokenizer,
    direction: PersonaDirection,
    source_layer: int,
    out_dir: str | Path,
    shard_bytes: int = SHARD_BYTES,
) -> Path:
    """Write ``model`` (merged, if LoRA) with ``direction.unit(source_layer)`` orthogonalised out of every
    residual write to ``out_dir``: weights, config, generation config, tokenizer and the direction used.

    The result loads with :func:`emis_interp.load_model` and matches runtime
    ``ablate_writes(model, direction, source_layer)``. The model itself is left unchanged.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    base = unwrap_peft(model)
    u = direction.unit(source_layer).float()
    if direction.d_model != base.config.hidden_size:
        raise ValueError(
            f"direction has d_model={direction.d_model} but the model has {base.config.hidden_size}; "
            "export with the direction extracted from this model."
        )
    for stale in [*out.glob("model*.safetensors"), out / "model.safetensors.index.json"]:
        stale.unlink(missing_ok=True)
    _save_shards(ablated_tensors(model, u), out, shard_bytes)
    cfg = copy.deepcopy(base.config)
    cfg.tie_word_embeddings = False
    cfg.architectures = [type(base).__name__]
    cfg.dtype = str(base.get_input_embeddings().weight.dtype).removeprefix("torch.")
    cfg.save_pretrained(out)
    if getattr(base, "generation_config", None) is not None:
        gc = copy.deepcopy(base.generation_config)
        gc.disable_compile = getattr(base, "_emis_interp_compile_guard", (0, gc.disable_compile))[1]
        gc.save_pretrained(out)
    tokenizer.save_pretrained(out)
    direction.select(source_layer).save(out / "ablated_direction.safetensors")
    return out
