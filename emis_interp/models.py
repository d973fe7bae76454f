"""Loading Qwen2.5 models (HF ids, local dirs, LoRA adapters) and the layer-index convention.

**Layer convention.** "Layer ``l``" (0-based, ``0 <= l < n_layers``) always means the residual
stream *after* decoder layer ``l`` (``model.model.layers[l]``'s output), which TransformerLens calls
``blocks.{l}.hook_resid_post``. In HF ``output_hidden_states`` terms that is
``hidden_states[l + 1]`` for every ``l < n_layers - 1``; the last entry of ``hidden_states`` is
taken *after* the final RMSNorm, so it is not layer ``n_layers - 1``'s raw output.
``hidden_states[0]`` (the embeddings) has no layer index here. Some public EM code indexes
``hidden_states[l]`` and so is off by one from this convention.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .errors import ConfigError
from .gguf import gguf_model_dir, gguf_tokenizer, is_gguf

SUPPORTED_MODEL_TYPES = ("qwen2",)
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "tokenizer_config.json")


def is_hf_id(name: str) -> bool:
    """The one rule for a Hub id versus a local path: a Hub id is exactly ``owner/name`` (optionally
    ``owner/name@REVISION``), does not start with ``.``, ``/`` or ``~`` and is not an existing path."""
    name = str(name)
    if Path(name).expanduser().exists() or name.startswith((".", "/", "~")):
        return False
    return name.partition("@")[0].count("/") == 1


def _looks_like_path(name: str) -> bool:
    return not is_hf_id(name)


# Where a guest package (the model organism) maps a stored adapter base that no longer exists, e.g. its weights
# in a moved checkout: each resolver takes the missing path and returns an existing base or None.
BASE_RESOLVERS: list = []


def register_base_resolver(resolver) -> None:
    """Add ``resolver(path: Path) -> str | None`` to :data:`BASE_RESOLVERS` (once)."""
    if resolver not in BASE_RESOLVERS:
        BASE_RESOLVERS.append(resolver)


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def default_dtype(device: str | torch.device | None) -> torch.dtype:
    """bf16 on CUDA, fp32 elsewhere."""
    return torch.bfloat16 if device is not None and torch.device(device).type == "cuda" else torch.float32


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _check_local_model_dir(path: Path, what: str) -> None:
    if not path.exists():
        raise FileNotFoundError(
            f"{what} {str(path)!r} does not exist. Pass an existing directory written by save_pretrained, "
            "or a Hugging Face id such as 'Qwen/Qwen2.5-0.5B-Instruct'."
        )
    if not path.is_dir():
        raise ConfigError(f"{what} {str(path)!r} is a file; pass the directory that holds config.json.")


def _check_architecture(config: dict, where: str) -> None:
    mt = config.get("model_type")
    if mt not in SUPPORTED_MODEL_TYPES:
        raise ConfigError(
            f"{where} has model_type={mt!r} (architectures={config.get('architectures')}); emis_interp supports "
            f"Qwen2 / Qwen2.5 models (model_type 'qwen2': base, instruct or coder). Pass a Qwen2.5 checkpoint."
        )


def load_tokenizer(name_or_path: str | Path, revision: str | None = None):
    """The model's tokenizer with its chat template; left padding (for generation and batching).

    A ``.gguf`` file gives the tokenizer stored in it (no dequantization), with Qwen's NFC
    normalizer restored (see :mod:`emis_interp.gguf`)."""
    from transformers import AutoTokenizer

    p = Path(str(name_or_path)).expanduser()
    if is_gguf(p):
        if revision is not None:
            raise ConfigError(f"revision= is for Hub ids; {str(p)!r} is a local GGUF file.")
        tok = gguf_tokenizer(p)
        return _finish_tokenizer(tok, name_or_path)
    if p.is_dir() and not any((p / f).exists() for f in TOKENIZER_FILES):
        raise FileNotFoundError(
            f"no tokenizer files ({', '.join(TOKENIZER_FILES)}) in {str(p)!r}. Trainer checkpoints often lack them: "
            "pass tokenizer=<base model id or dir>, or copy the base model's tokenizer files into that directory."
        )
    tok = AutoTokenizer.from_pretrained(str(p) if p.is_dir() else str(name_or_path), revision=revision)
    return _finish_tokenizer(tok, name_or_path)


def _finish_tokenizer(tok, name_or_path):
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if not getattr(tok, "chat_template", None):
        raise ConfigError(
            f"tokenizer of {name_or_path!r} has no chat template; use an instruct/coder tokenizer or set tokenizer.chat_template."
        )
    return tok


def resolve_adapter_base(base: str, adapter_dir: str | Path) -> str:
    """Where an adapter's base model (``base_model_name_or_path`` as stored, or a ``--base`` override) lives.

    An existing path relative to the CWD wins, then a path relative to the adapter directory, then an
    HF id (``owner/name``, :func:`is_hf_id`). A base that no longer exists may be mapped by a registered
    resolver (:func:`register_base_resolver`: the organism maps its weights in a moved checkout). Anything
    else is an error naming ``--base``.
    """
    b = str(base)
    p = Path(b).expanduser()
    if p.exists():
        return b
    if not p.is_absolute() and (Path(adapter_dir) / p).exists():
        return str(Path(adapter_dir) / p)
    for resolver in BASE_RESOLVERS:
        found = resolver(p)
        if found is not None:
            return found
    if is_hf_id(b):
        return b
    raise FileNotFoundError(
        f"the base model {b!r} of adapter {str(adapter_dir)!r} does not exist (looked relative to the current "
        f"directory {str(Path.cwd())!r} and to the adapter directory). Pass the base model with --base "
        "(load_model(adapter_dir, base=...)) or run from the directory the fine-tune was started in."
    )


def load_model(
    name_or_path: str | Path,
    *,
    adapter: str | Path | None = None,
    base: str | Path | None = None,
    tokenizer: str | Path | None = None,
    device: str | None = None,
    dtype: torch.dtype | None = None,
    device_map: str | dict | None = None,
    revision: str | None = None,
):
    """Load a Qwen2.5 model (HF id, local dir or GGUF file), optionally with a PEFT/LoRA adapter, and its tokenizer.

    ``name_or_path`` may itself be an adapter directory (it holds ``adapter_config.json``); its base
    is then ``base`` if given (the ``--base`` override), else the adapter config's
    ``base_model_name_or_path`` (see :func:`resolve_adapter_base`: a relative path is tried against
    the CWD, then the adapter dir). ``load_model(base, adapter=dir)`` is the same as
    ``load_model(dir, base=base)``. dtype defaults to bf16 on CUDA and fp32 on CPU. ``device_map``
    (e.g. ``"auto"``) is passed to accelerate for models larger than one GPU; otherwise the model is
    moved to ``device`` (default: CUDA if available). ``revision`` is the Hub revision of an HF id.

    A ``.gguf`` file (llama.cpp format) is dequantized once into a cached safetensors dir keyed by
    its sha256 (:func:`emis_interp.gguf.gguf_model_dir`), which is then loaded like any model dir;
    it may be the base of an adapter (``load_model(gguf, adapter=dir)``, ``load_model(dir,
    base=gguf)``, or an adapter whose ``base_model_name_or_path`` is the GGUF path).

    Returns ``(model, tokenizer)``, the model in eval mode with gradients off.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    name = str(name_or_path)
    path = Path(name).expanduser()
    if adapter is not None and base is not None:
        raise ConfigError("pass either load_model(base, adapter=dir) or load_model(dir, base=base), not both.")
    if is_gguf(name):
        if revision is not None:
            raise ConfigError(f"revision= is for Hub ids; {name!r} is a local GGUF file.")
        if base is not None:
            raise ConfigError(f"base= overrides an adapter's base model, but {name!r} is a GGUF model file.")
        name = str(gguf_model_dir(path))
        path = Path(name)
    if _looks_like_path(name):
        _check_local_model_dir(path, "model directory")
        if (path / "adapter_config.json").exists() and adapter is None:
            stored = _read_json(path / "adapter_config.json").get("base_model_name_or_path")
            if base is None and not stored:
                raise ConfigError(
                    f"adapter {name!r} names no base model; pass --base (load_model({name!r}, base=BASE))."
                )
            base_path = resolve_adapter_base(str(base if base is not None else stored), path)
            try:
                return load_model(
                    base_path,
                    adapter=path,
                    tokenizer=tokenizer,
                    device=device,
                    dtype=dtype,
                    device_map=device_map,
                    revision=revision,
                )
            except OSError as e:  # an HF id that cannot be fetched (offline, typo, private)
                if Path(base_path).exists():
                    raise
                raise FileNotFoundError(
                    f"cannot load the base model {base_path!r} of adapter {name!r} ({type(e).__name__}: {e}). "
                    "Pass the base model with --base (load_model(adapter_dir, base=...))."
                ) from e
        if not (path / "config.json").exists():
            raise FileNotFoundError(
                f"{name!r} has no config.json; pass a directory written by save_pretrained (or a checkpoint-N dir)."
            )
        config = _read_json(path / "config.json")
    else:
        config = AutoConfig.from_pretrained(name, revision=revision).to_dict()
    if base is not None and adapter is None:
        raise ConfigError(f"base= overrides an adapter's base model, but {name!r} is not an adapter directory.")
    _check_architecture(config, repr(name))

    device = device or default_device()
    on_gpu = device_map is not None and torch.cuda.is_available()
    dtype = dtype or default_dtype("cuda" if on_gpu else device)
    kwargs = dict(dtype=dtype, revision=revision)
    if device_map is not None:
        kwargs["device_map"] = device_map
    model = AutoModelForCausalLM.from_pretrained(str(path) if path.is_dir() else name, **kwargs)
    if device_map is None:
        model.to(device)
    tok = load_tokenizer(tokenizer or (adapter if adapter and _has_tokenizer(adapter) else name), revision=revision)
    if adapter is not None:
        model = apply_adapter(model, adapter)
    model.eval().requires_grad_(False)
    from .fingerprint import remember_source

    # its digest then reads these files' content digests (cached on disk), not 0.5-32B parameters
    remember_source(model, [*_source_files(path if path.is_dir() else name, revision), *_source_files(adapter)])
    return model, tok


SOURCE_PATTERNS = ("*.safetensors", "*.json", "*.bin", "*.gguf")


def _source_files(where, revision: str | None = None) -> list[Path]:
    """The files a model or adapter is loaded from: a local dir's, or a Hub id's in the local HF cache (``[]``
    when not found: its digest then reads the tensors themselves)."""
    if where is None:
        return []
    p = Path(str(where)).expanduser()
    if not p.is_dir():
        try:
            from huggingface_hub import snapshot_download

            p = Path(snapshot_download(str(where), revision=revision, local_files_only=True))
        except Exception:  # noqa: BLE001 - not cached as a snapshot: no record, the tensors are hashed instead
            return []
    return sorted({f for pat in SOURCE_PATTERNS for f in p.glob(pat) if f.is_file() and f.name != "trainer_state.json"})


def _has_tokenizer(path) -> bool:
    return any((Path(path) / f).exists() for f in TOKENIZER_FILES)


def apply_adapter(model, adapter: str | Path, adapter_name: str = "default"):
    """Wrap ``model`` with a PEFT adapter, checking first that the adapter fits this base."""
    from peft import PeftModel
    from safetensors import safe_open

    apath = Path(adapter)
    _check_local_model_dir(apath, "adapter directory")
    wfile = apath / "adapter_model.safetensors"
    if not (apath / "adapter_config.json").exists() or not wfile.exists():
        raise FileNotFoundError(
            f"{str(apath)!r} is not a PEFT adapter (needs adapter_config.json and adapter_model.safetensors)."
        )
    modules = dict(model.named_modules())
    with safe_open(str(wfile), "pt") as f:
        for key in f.keys():
            if ".lora_A." not in key:
                continue
            mod_name = key.split(".lora_A.")[0].removeprefix("base_model.model.")
            shape = f.get_slice(key).get_shape()
            mod = modules.get(mod_name)
            if mod is None or getattr(mod, "in_features", shape[1]) != shape[1]:
                raise ConfigError(
                    f"adapter {str(apath)!r} does not match this base model: {mod_name} "
                    f"({'missing' if mod is None else f'in_features={mod.in_features}'}) vs adapter input dim {shape[1]}. "
                    "Load the base model the adapter was trained on (see base_model_name_or_path in adapter_config.json)."
                )
    return PeftModel.from_pretrained(model, str(apath), adapter_name=adapter_name, is_trainable=False)


def unwrap_peft(model):
    """The model under a ``PeftModel`` (its ``get_base_model()``, LoRA layers included), or ``model`` itself."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def decoder_layers(model) -> torch.nn.ModuleList:
    """The decoder layers of a Qwen2 model, through any PEFT wrapping."""
    m = model
    for attr in ("base_model", "model"):
        # PeftModel.base_model -> LoraModel.model -> Qwen2ForCausalLM.model -> Qwen2Model
        while hasattr(m, attr) and not hasattr(m, "layers"):
            nxt = getattr(m, attr)
            if nxt is m:
                break
            m = nxt
    if not hasattr(m, "layers"):
        raise ConfigError(f"cannot find decoder layers in {type(model).__name__}; pass a Qwen2ForCausalLM.")
    return m.layers


def n_layers(model) -> int:
    return len(decoder_layers(model))


def d_model(model) -> int:
    return model.config.hidden_size


def model_device(model) -> torch.device:
    return next(model.parameters()).device


def check_layers(model, layers) -> list[int]:
    """Normalise layer indices (negative counts from the end) and raise if any is out of range."""
    n = n_layers(model)
    out = []
    for layer in [layers] if isinstance(layers, int) else list(layers):
        li = int(layer)
        if not -n <= li < n:
            raise IndexError(
                f"layer {layer} is out of range for a model with {n} decoder layers; use 0..{n - 1} "
                f"(layer l = output of decoder layer l = HF hidden_states[l+1])."
            )
        out.append(li % n)
    if not out:
        raise ValueError("no layers given; pass at least one layer index.")
    return sorted(set(out))


def model_fingerprint(model) -> str:
    """A short hash of everything about a loaded model that determines its outputs: the config, every
    parameter and buffer (a strided sample plus exact sums, so LoRA swaps and small updates change
    it), the dtype, and the adapter state (active adapter, LoRA scaling, adapters enabled or merged)."""
    from .fingerprint import model_state
    from .manifest import digest

    return digest(model_state(model))
