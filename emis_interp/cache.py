"""Atomic safetensors files and the activation cache under ``cache/``.

Entries are named by the key of a :class:`emis_interp.manifest.Manifest` (model weights and
adapter state, backend, tokenizer and chat template, prompts, layers, reduction) and carry that
manifest in their metadata; an entry whose stored manifest differs is recomputed. Every file is written to a temporary name and renamed
into place, and carries a SHA-256 of its tensor bytes in its metadata: a truncated or corrupt
file is detected on read, deleted and recomputed, never silently used. Nothing is pickled.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

_REPO_CACHE = Path(__file__).resolve().parents[1] / "cache"
# $EMIS_INTERP_CACHE, else the checkout's cache/ (editable install), else ./cache
DEFAULT_CACHE_DIR = Path(os.environ.get("EMIS_INTERP_CACHE") or (_REPO_CACHE if _REPO_CACHE.is_dir() else "cache"))


def _digest(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for k in sorted(tensors):
        t = tensors[k].detach().contiguous().cpu()
        h.update(k.encode())
        h.update(str(t.dtype).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def atomic_save(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> Path:
    """Save safetensors atomically (temp file + ``os.replace``) with a checksum in the metadata."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    meta = dict(metadata or {})
    meta["sha256"] = _digest(tensors)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=meta)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def atomic_write_text(path: Path, text: str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)
    return path


def text_block(text: str, start: str, end: str) -> str:
    """The text between the markers ``start`` and ``end`` (a generated block of a README); raises when either is
    missing."""
    if start not in text or end not in text:
        raise ValueError(f"no generated block between the markers {start!r} / {end!r}; add both markers")
    return text.split(start, 1)[1].split(end, 1)[0].strip("\n")


def write_text_block(path: Path, start: str, end: str, body: str) -> Path:
    """Replace the block between the markers ``start`` and ``end`` of the file at ``path`` by ``body``, atomically
    (the one writer of generated README blocks)."""
    text = Path(path).read_text()
    text_block(text, start, end)  # checks the markers
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    return atomic_write_text(Path(path), f"{head}{start}\n{body}\n{end}{tail}")


class CorruptCacheError(RuntimeError):
    pass


def verified_load(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Load a file written by :func:`atomic_save`; raise :class:`CorruptCacheError` if it does not check out."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            meta = dict(f.metadata() or {})
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CorruptCacheError(f"{path}: unreadable ({e})") from e
    if meta.get("sha256") != _digest(tensors):
        raise CorruptCacheError(f"{path}: checksum mismatch")
    return tensors, meta


def cached(
    path: Path, compute, manifest, metadata: dict[str, str] | None = None
) -> tuple[dict[str, torch.Tensor], bool]:
    """Return ``(tensors, hit)``: the verified file at ``path`` made for ``manifest``, or ``compute()``
    saved there atomically with the manifest in its metadata.

    A corrupt or truncated file, or one whose stored manifest differs, is removed and recomputed.
    """
    import warnings

    path = Path(path)
    if path.exists():
        try:
            tensors, meta = verified_load(path)
            stored = type(manifest).from_json(meta["manifest"]) if "manifest" in meta else None
            if stored is not None and stored.key == manifest.key:
                return tensors, True
            warnings.warn(f"recomputing cache entry {path.name}: it was made under another manifest", stacklevel=2)
        except CorruptCacheError as e:
            warnings.warn(f"recomputing corrupt cache entry: {e}", stacklevel=2)
        path.unlink(missing_ok=True)
    tensors = compute()
    atomic_save(tensors, path, {**(metadata or {}), "manifest": manifest.to_json()})
    return tensors, False
