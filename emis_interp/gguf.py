"""GGUF files as model inputs: dequantize once into a cached safetensors model dir, keyed by the file's digest.

``load_model("model.gguf")`` (and so ``--model model.gguf`` in every CLI) calls :func:`gguf_model_dir`,
which hashes the file (sha256, about 1 s per 500 MB) and returns ``<cache>/gguf/<sha256>/``: a
``save_pretrained`` directory (fp32 safetensors, config, tokenizer) plus ``gguf_manifest.json``. The
first call dequantizes with transformers' GGUF reader (``from_pretrained(dir, gguf_file=...)``; a
0.5B Q4_K_M file takes ~10 s and writes ~2.5 GB); later calls only hash. A directory whose manifest
does not match (another transformers or gguf version, an older format) is rebuilt, never reused.
The directory is written under a temporary name and renamed into place, so an interrupted build
leaves nothing that looks finished.

The cache root is ``$EMIS_INTERP_CACHE`` if set, else ``~/.cache/emis_interp`` (per machine, shared
by every clone). Nothing here downloads anything.

What the conversion changes, and why:

- the dequantized weights are stored in fp32 (transformers dequantizes to fp32; casting to bf16 at
  load time is the caller's choice, as for any checkpoint);
- ``quantization_config`` is dropped from the config and the loader's quantizer detached: the saved
  weights are plain tensors, and ``save_pretrained`` refuses otherwise;
- Qwen2 tokenizers get back the NFC normalizer of the official Qwen2.5 ``tokenizer.json``
  (``"normalizer": {"type": "NFC"}``), which the GGUF tokenizer lacks: without it, text with
  decomposed accents ("cafe" + U+0301) tokenizes differently from the original model.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import torch

from .errors import ConfigError

CACHE_ENV = "EMIS_INTERP_CACHE"
MANIFEST = "gguf_manifest.json"
FORMAT = 1  # bump when the conversion changes: every cached dir is then rebuilt
GGUF_MAGIC = b"GGUF"
SUPPORTED_ARCHITECTURES = ("qwen2",)


def cache_home() -> Path:
    """The per-machine cache root: ``$EMIS_INTERP_CACHE`` or ``~/.cache/emis_interp``."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "emis_interp"


def is_gguf(path: str | Path) -> bool:
    """Whether ``path`` names a GGUF file (by suffix; :func:`gguf_model_dir` then checks the magic)."""
    return str(path).lower().endswith(".gguf")


def file_sha256(path: str | Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    import gguf
    import transformers

    try:
        gguf_version = version("gguf")
    except PackageNotFoundError:  # pragma: no cover - an uninstalled source checkout
        gguf_version = getattr(gguf, "__version__", "unknown")
    return {"transformers": transformers.__version__, "gguf": gguf_version}


def _check_gguf_file(path: Path) -> str:
    """Raise a clear error unless ``path`` is a readable GGUF file of a supported architecture; return it."""
    if not path.exists():
        raise FileNotFoundError(f"GGUF file {str(path)!r} does not exist.")
    if not path.is_file():
        raise ConfigError(f"{str(path)!r} ends in .gguf but is not a file; pass the .gguf file itself.")
    with open(path, "rb") as f:
        if f.read(4) != GGUF_MAGIC:
            raise ConfigError(f"{str(path)!r} is not a GGUF file (no GGUF magic); pass a llama.cpp .gguf model file.")
    try:
        import gguf  # noqa: F401
    except ImportError as e:
        raise ImportError("loading a .gguf model needs the gguf package: pip install 'gguf>=0.10'") from e
    from gguf import GGUFReader

    field = GGUFReader(str(path)).fields.get("general.architecture")
    arch = field.contents() if field is not None else None
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ConfigError(
            f"GGUF file {str(path)!r} has general.architecture={arch!r}; emis_interp supports Qwen2 / Qwen2.5 "
            "models (architecture 'qwen2'). Pass a Qwen2.5 GGUF."
        )
    return arch


def expected_manifest(path: str | Path, digest: str | None = None) -> dict:
    """What a converted dir of ``path`` must record to be reused: the file's digest and size, the
    conversion format, the transformers and gguf versions that dequantized it, and the stored dtype."""
    p = Path(path)
    return {
        "format": FORMAT,
        "gguf_sha256": digest or file_sha256(p),
        "gguf_bytes": p.stat().st_size,
        **_versions(),
        "dtype": "float32",
        "tokenizer_normalizer": "NFC",
    }


def read_manifest(model_dir: str | Path) -> dict | None:
    f = Path(model_dir) / MANIFEST
    try:
        return json.loads(f.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _matches(found: dict | None, want: dict) -> bool:
    return found is not None and all(found.get(k) == v for k, v in want.items())


def gguf_tokenizer(path: str | Path):
    """The tokenizer stored in a GGUF file, with the official Qwen2.5 NFC normalizer restored."""
    from tokenizers import normalizers
    from transformers import AutoTokenizer

    p = Path(path).expanduser()
    tok = AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name)
    backend = tok.backend_tokenizer
    if backend.normalizer is None:
        backend.normalizer = normalizers.NFC()
    return tok


def _replace_dir(tmp: Path, out: Path, want: dict) -> None:
    """Move the finished ``tmp`` to ``out``. An ``out`` that another process finished meanwhile (its
    manifest matches ``want``) is kept, since a reader may be loading it; a stale one is moved aside, then removed."""
    if _matches(read_manifest(out), want):
        shutil.rmtree(tmp, ignore_errors=True)
        return
    if out.exists():
        trash = out.with_name(f".{out.name}.stale-{os.getpid()}")
        os.replace(out, trash)
        shutil.rmtree(trash, ignore_errors=True)
    os.replace(tmp, out)


def convert_gguf(path: str | Path, out_dir: str | Path, *, digest: str | None = None) -> Path:
    """Dequantize the GGUF file ``path`` into a ``save_pretrained`` dir at ``out_dir`` (atomically).

    ``out_dir`` is replaced if it exists. The dir holds fp32 safetensors, the config (without
    ``quantization_config``), the tokenizer (NFC restored) and ``gguf_manifest.json``.
    """
    from transformers import AutoModelForCausalLM

    p = Path(path).expanduser().resolve()
    arch = _check_gguf_file(p)
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    manifest = expected_manifest(p, digest)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model = AutoModelForCausalLM.from_pretrained(str(p.parent), gguf_file=p.name, dtype=torch.float32)
        model.hf_quantizer = None  # the weights are dequantized; save_pretrained refuses while a quantizer is set
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        gguf_tokenizer(p).save_pretrained(tmp)
        manifest.update(
            source_name=p.name,
            architecture=arch,
            general_name=getattr(model.config, "_model_name_or_path", None) or None,
            n_params=sum(t.numel() for t in model.parameters()),
        )
        del model
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
        _replace_dir(tmp, out, expected_manifest(p, manifest["gguf_sha256"]))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def gguf_model_dir(path: str | Path, cache_dir: str | Path | None = None) -> Path:
    """The converted model dir of the GGUF file ``path``: ``<cache_dir>/<sha256>/``, built if missing or stale.

    ``cache_dir`` defaults to ``cache_home() / "gguf"``. The key is the file's sha256, so a renamed or
    copied file reuses its conversion and an edited one gets a new dir.
    """
    p = Path(path).expanduser()
    _check_gguf_file(p)
    digest = file_sha256(p)
    out = Path(cache_dir) if cache_dir is not None else cache_home() / "gguf"
    out = out / digest
    if _matches(read_manifest(out), expected_manifest(p, digest)):
        return out
    print(f"[emis_interp] dequantizing {p.name} once into {out} (fp32: 4 bytes a parameter on disk; ~10 s for 0.5B)")
    return convert_gguf(p, out, digest=digest)
