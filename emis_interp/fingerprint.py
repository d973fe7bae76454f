"""A loaded model's fingerprint: the digest of its weights and where and how it computes.

:func:`weights_digest` digests the config and every parameter and buffer, reading in full only the tensors edited
since the model was loaded from files recorded by :func:`remember_source` (whose content digests are computed once
and remembered on disk, :func:`content_digest`); :func:`model_state` adds the adapter state, dtype and training mode,
:func:`placement_state` the devices, GPU model and attention implementation. These fields go into every
:class:`~emis_interp.manifest.Manifest` that depends on a model.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from .errors import ConfigError
from .manifest import adapter_state, digest

_MOD = 2**61 - 1  # checksums are accumulated exactly, in Python ints, modulo a Mersenne prime
_CHUNK = 1 << 24


def tensor_bits(t: torch.Tensor) -> torch.Tensor:
    """A tensor's raw bits as integer words (flat): compare two tensors bit for bit with ``torch.equal``."""
    return _bits(t)


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's raw bytes as non-negative 16-bit (or 8-bit) words, flat, on its own device."""
    flat = t.detach().contiguous().reshape(-1)
    if flat.element_size() == 1:
        return flat.view(torch.uint8)
    return flat.view(torch.int16)


@torch.no_grad()
def tensor_checksum(t: torch.Tensor) -> tuple[int, int]:
    """An exact integer checksum of a tensor's bits: ``(sum of words, position-weighted sum)``.

    Integer arithmetic, so the same on any device, thread count or GPU type (a float sum is not),
    and the position weights catch values that trade places. Runs on the tensor's device in chunks
    of 16M words (bounded temporaries).
    """
    words = _bits(t)
    total = weighted = 0
    for start in range(0, words.numel(), _CHUNK):
        w = words[start : start + _CHUNK].to(torch.int64) & 0xFFFF
        pos = (torch.arange(start, start + w.numel(), device=w.device, dtype=torch.int64) % 65521) + 1
        sums = torch.stack([w.sum(), (w * pos).sum()]).tolist()  # each < 2**57: exact in int64
        total, weighted = (total + sums[0]) % _MOD, (weighted + sums[1]) % _MOD
    return total, weighted


def offloaded_value(model, name: str) -> torch.Tensor:
    """The value of parameter/buffer ``name`` that accelerate's CPU/disk offload keeps out of the module (the
    module holds a meta tensor; an ``AlignDevicesHook`` on it or an ancestor holds the value in its weights map).
    Raises :class:`ConfigError` when no hook holds it: a meta tensor with no value cannot be fingerprinted."""
    parts = name.split(".")
    for i in range(len(parts) - 1, -1, -1):
        try:
            mod = model.get_submodule(".".join(parts[:i]))
        except AttributeError:
            continue
        hook = getattr(mod, "_hf_hook", None)
        for hk in getattr(hook, "hooks", None) or ([hook] if hook is not None else []):
            wmap = getattr(hk, "weights_map", None)
            if wmap is None:
                continue
            try:
                return wmap[".".join(parts[i:])]
            except KeyError:
                continue
    raise ConfigError(
        f"{name} is on the meta device and no offload hook holds its value: the model is not fully loaded, so it "
        "cannot be fingerprinted. Load the model completely (no meta tensors) before caching its outputs."
    )


def _tensor_key(t: torch.Tensor) -> tuple | None:
    # ``_version`` counts in-place writes (copy_, mul_, Trajectory.goto's swaps, foreach/for-loop optimizer steps), not
    # writes through ``.data`` nor fused optimizer steps (weights_digest's samples are their backstop)
    try:
        return (t.data_ptr(), t._version, str(t.dtype), tuple(t.shape), str(t.device))
    except RuntimeError:  # an inference-mode tensor has no version counter: never trust a cached checksum
        return None


# --- where a loaded model's weights came from (so that its digest need not read them) --------------------------------

FILE_DIGESTS = "file_digests.json"  # the sidecar of content digests of weight files, in the cache directory


def content_digest(path: str | Path, cache_dir: str | Path | None = None) -> str:
    """sha256 of a file's whole content, computed once and remembered in ``<cache_dir>/file_digests.json`` keyed by
    the file's real path, size, mtime, ctime and inode (a rewrite or replacement changes the key)."""
    from .cache import DEFAULT_CACHE_DIR, atomic_write_text

    p = Path(path).resolve()
    st = p.stat()
    key = f"{p}|{st.st_size}|{st.st_mtime_ns}|{st.st_ctime_ns}|{st.st_ino}"
    side = Path(cache_dir or DEFAULT_CACHE_DIR) / FILE_DIGESTS
    try:
        known = json.loads(side.read_text())
    except (OSError, json.JSONDecodeError):
        known = {}
    if key not in known:
        h = hashlib.sha256()
        with p.open("rb") as f:
            for chunk in iter(lambda: f.read(16 << 20), b""):
                h.update(chunk)
        try:  # re-read: another process may have added entries meanwhile
            known = json.loads(side.read_text())
        except (OSError, json.JSONDecodeError):
            known = {}
        # forget the file's older versions and files that are gone (temporary checkpoints)
        known = {k: v for k, v in known.items() if not k.startswith(f"{p}|") and Path(k.split("|")[0]).exists()}
        known[key] = h.hexdigest()
        try:
            side.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(side, json.dumps(known, indent=0, sort_keys=True))
        except OSError:  # a read-only cache: the digest is right, only not remembered
            pass
    return known[key]


def remember_source(model, files, cache_dir: str | Path | None = None) -> None:
    """Record that ``model``'s tensors, as they are now, were loaded from ``files`` (weights, adapter and config
    files): :func:`weights_digest` then digests the files' content (cached on disk, :func:`content_digest`) for every
    tensor not written since, and reads in full only the tensors edited in place (their version counter, storage,
    dtype or device changed). :func:`emis_interp.models.load_model` calls it; call it for a model you loaded
    yourself, with every file it was loaded from, right after loading it."""
    files = sorted({str(Path(f).resolve()) for f in files})
    if not files:
        return
    stamp = digest({"files": {f: content_digest(f, cache_dir) for f in files}, "versions": library_versions()})
    named = [*model.named_parameters(), *((f"buffer:{k}", b) for k, b in model.named_buffers())]
    model.__dict__["_emis_source"] = (stamp, {n: _tensor_key(t) for n, t in named})


def _fast_checksum(t: torch.Tensor):
    """An exact digest of a tensor's bits: sha256 of its bytes on the CPU (no copy), the integer
    :func:`tensor_checksum` on an accelerator (no host transfer)."""
    if t.device.type != "cpu":
        return tensor_checksum(t)
    flat = t.detach().contiguous().reshape(-1)
    return hashlib.sha256((flat.view(torch.uint8) if flat.dtype != torch.bool else flat).numpy()).hexdigest()


def _row_sample(p: torch.Tensor) -> torch.Tensor:
    """One value of every row of ``p`` (first dim), the column varying with the row. A write that bypasses the
    version counter (through ``.data``, or a fused optimizer step such as the HF Trainer's default
    ``adamw_torch_fused``) to whole rows, e.g. the embedding rows of the tokens a batch touched, changes it."""
    rows = p.detach().reshape(p.shape[0], -1)
    cols = torch.arange(rows.shape[0], device=p.device, dtype=torch.int64) * 7919 % rows.shape[1]
    return rows.gather(1, cols[:, None]).reshape(-1)


@torch.no_grad()
def weights_digest(model, sample: int = 4096) -> str:
    """Digest of the config and every parameter and buffer.

    Per tensor: if it is unchanged since the model was loaded from files recorded by :func:`remember_source`
    (same storage, version counter, dtype, device), the files' content digest stands for it (read once per file
    and remembered on disk); otherwise an exact digest of its bits (:func:`_fast_checksum`, cached on the model
    and recomputed only when the tensor's storage, version counter, dtype or device changes). Plus, on every
    call, a strided sample of every tensor's values and one value of every row (:func:`_row_sample`): the backstop
    for writes that bypass the version counter (through ``.data``; fused optimizer steps, the HF Trainer's default).
    Such a write is seen if it changes a sampled value: a write to whole rows always is, a write to a few single
    values may not be (write weights in place on the parameter, under ``torch.no_grad()``, or reload the model).
    The samples are gathered on the device and copied to the host once.
    """
    h = hashlib.sha256(json.dumps(model.config.to_dict(), sort_keys=True, default=str).encode())
    stamp, loaded = model.__dict__.get("_emis_source", (None, {}))
    if stamp is not None:
        h.update(f"source:{stamp}".encode())
    cache: dict = model.__dict__.setdefault("_emis_checksums", {})
    named = list(model.named_parameters()) + [(f"buffer:{k}", b) for k, b in model.named_buffers()]
    samples: dict[torch.device, list[torch.Tensor]] = {}
    for name, p in sorted(named, key=lambda kv: kv[0]):
        h.update(f"{name}{tuple(p.shape)}{p.dtype}{p.device.type}".encode())
        if p.numel() == 0:
            continue
        if p.device.type == "meta":  # offloaded (accelerate): its value lives in a hook's weights map
            h.update(repr(_fast_checksum(offloaded_value(model, name.removeprefix("buffer:")))).encode())
            continue
        key = _tensor_key(p)
        if key is not None and loaded.get(name) == key:
            h.update(b"as-loaded")
        else:
            hit = cache.get(name)
            if hit is None or key is None or hit[0] != key:
                hit = cache[name] = (key, _fast_checksum(p))
            h.update(repr(hit[1]).encode())
        words = _bits(p)
        got = samples.setdefault(p.device, [])
        got.append(words[:: max(1, words.numel() // sample)][:sample].to(torch.int32))
        if p.dim() >= 2:  # one value of every row (which one varies with the row): sees writes to whole rows
            got.append(_bits(_row_sample(p)).to(torch.int32))
    for dev in sorted(samples, key=str):
        h.update(torch.cat(samples[dev]).cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def library_versions() -> dict[str, str]:
    """Versions of the libraries whose kernels and loading code determine a forward pass's numbers."""
    import importlib.metadata as md
    import sys

    out = {"python": sys.version.split()[0]}
    for lib in ("torch", "transformers", "peft", "accelerate", "safetensors"):
        try:
            out[lib] = md.version(lib)
        except md.PackageNotFoundError:
            out[lib] = None
    return out


def placement_state(model) -> dict:
    """Where and how a model computes: parameter dtypes, devices (GPU model included: kernels differ), and the
    attention implementation (eager, sdpa and flash attention give different numbers)."""
    devices = sorted({str(p.device) for p in model.parameters()})
    names = sorted({torch.cuda.get_device_name(d) for d in devices if d.startswith("cuda")})
    config = getattr(model, "config", None)
    attn = getattr(config, "_attn_implementation", None) or getattr(config, "attn_implementation", None)
    return {
        "dtypes": sorted({str(p.dtype) for p in model.parameters()}),
        "devices": devices,
        "gpus": names,
        "attn_implementation": attn,
    }


def model_state(model) -> dict:
    """Everything about a loaded model that determines its activations: weights, adapters, dtype, and
    whether it is in training mode (dropout)."""
    return {
        "weights": weights_digest(model),
        "dtype": str(next(model.parameters()).dtype),
        "training": bool(model.training),
        **adapter_state(model),
    }
