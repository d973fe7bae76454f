"""One mechanism for the identity of every cache entry and every resumable output.

A :class:`Manifest` is a flat mapping ``field -> value`` of everything that determines a result
(the model's weights and adapter state, the tokenizer and chat template, the prompts, layers,
reduction, generation settings, direction vectors, recipe or world version...). Large inputs are
reduced to digests with :func:`digest`. Its :attr:`Manifest.key` names cache entries.

Two uses, two policies:

- a **cache** (activations, organism fine-tunes) stores the manifest beside the entry; when it
  does not match, the entry is recomputed (:func:`cache_valid`);
- a **resumable output** (sampling batches, ``track()``, ``finetune()``, judged rows) writes
  ``manifest.json`` into its directory (or a header next to its file); when a rerun's manifest
  differs, :func:`prepare_dir` refuses with :class:`ManifestMismatch`, naming the fields that
  differ and the ``--overwrite`` flag (``overwrite=True``), which clears the old output.

State that cannot be fingerprinted (an active intervention hook, a disabled adapter) makes
:func:`emis_interp.hooks.cacheable` False: such a pass neither reads nor writes a cache.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .errors import ConfigError

MANIFEST_FILE = "manifest.json"
FORMAT = "emis_interp.manifest/1"


class ManifestMismatch(ConfigError):
    """A resumable output was made under other settings than the ones given now."""


def _canon(obj):
    """A JSON-able canonical form: tensors become digests, dataclasses dicts, paths strings."""
    if isinstance(obj, torch.Tensor):
        return {"tensor": tensor_digest(obj)}
    if hasattr(obj, "__dataclass_fields__"):
        from dataclasses import asdict

        return _canon(asdict(obj))
    if isinstance(obj, Mapping):
        return {str(k): _canon(v) for k, v in sorted(obj.items(), key=lambda kv: str(kv[0]))}
    if isinstance(obj, (list, tuple)):
        return [_canon(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return repr(obj)
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, torch.dtype):
        return str(obj)
    return repr(obj)


def digest(obj, n: int = 16) -> str:
    """A stable hex digest of any JSON-able / tensor-holding object."""
    blob = json.dumps(_canon(obj), sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:n]


def source_digest(*objs) -> str:
    """A digest of the source code of modules (or functions, classes) that determine a result.

    Every cache key and resumable output's manifest carries one for the code it ran, so a changed
    sampler, capture or judge never silently reuses numbers the old code made. The source is read once
    per loaded object and remembered: a file edited on disk while a process runs its old code does not
    stamp the old code's results with the new digest; a reload (``importlib.reload``, Jupyter's autoreload)
    makes new function objects, which are read afresh. Package modules are read when the package is
    imported, and run as read then (:func:`snapshot_sources`). The digest is of :func:`normalised_source`: docstrings, comments and
    formatting do not change it."""
    return digest([normalised_source(_source(o)) for o in objs])


_NORMALISED: dict[str, str] = {}


def normalised_source(src: str) -> str:
    """The code of ``src`` without what cannot change a number: its AST with docstrings removed, unparsed (so no
    comments, blank lines or formatting). Source that does not parse is kept as it is."""
    import ast
    import textwrap

    if src not in _NORMALISED:
        try:
            tree = ast.parse(textwrap.dedent(src))
        except SyntaxError:
            _NORMALISED[src] = src
            return src
        for node in ast.walk(tree):
            body = getattr(node, "body", None)
            if (
                isinstance(node, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
                and body
                and isinstance(body[0], ast.Expr)
                and isinstance(body[0].value, ast.Constant)
                and isinstance(body[0].value.value, str)
            ):
                node.body = body[1:] or [ast.Pass()]
        _NORMALISED[src] = ast.unparse(tree)
    return _NORMALISED[src]


# kept across importlib.reload(manifest) (a reload re-executes the module in the same namespace): the sources
# of modules read at import must not be forgotten and read again from a disk that may have changed since
_SOURCES: dict = globals().get("_SOURCES", {})
_PINNED: dict = globals().get("_PINNED", {})  # module name -> its source text, read at its package's import
_PACKAGE_FILES: dict = globals().get("_PACKAGE_FILES", {})  # package -> {file path in it: module name}, fixed


def _load_token(obj):
    """Identifies one loaded version of ``obj``: a module by the identities of the functions it defines (new on
    reload; functions it imports are left out, so a package's ``__init__`` has one token while it imports)."""
    import inspect

    if inspect.ismodule(obj):
        own = (v for v in vars(obj).values() if inspect.isfunction(v) and v.__module__ == obj.__name__)
        return (obj.__name__, tuple(sorted(id(v) for v in own)))
    return id(obj)


def _remember(obj, src: str) -> str:
    import inspect

    # the object, and a module's functions, kept alive: their ids (the key) are never reused for another
    alive = (obj, [v for v in vars(obj).values() if inspect.isfunction(v)]) if inspect.ismodule(obj) else obj
    _SOURCES[_load_token(obj)] = (alive, src)
    return src


def _source(obj) -> str:
    import inspect

    key = _load_token(obj)
    if key not in _SOURCES:
        try:
            src = inspect.getsource(obj)
        except OSError:  # an empty module file has no source lines for inspect; its text is its source
            if not (inspect.ismodule(obj) and getattr(obj, "__file__", None) and Path(obj.__file__).is_file()):
                raise
            src = Path(obj.__file__).read_text()
        _remember(obj, src)
    return _SOURCES[key][1]


def _package_modules(package: str = "emis_interp") -> dict[str, str]:
    """``{file path: module name}`` for ``package`` and every module and subpackage in it, from its directory
    (importable names only, so an editor's lock or backup file is never listed; nothing is imported). Listed once
    per process, at the package's import (:func:`snapshot_sources`): a file added later changes nothing."""
    import importlib

    if package not in _PACKAGE_FILES:
        root = Path(importlib.import_module(package).__file__).parent
        files = {}
        for path in sorted(root.rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            in_packages = all((root.joinpath(*parts[:i]) / "__init__.py").is_file() for i in range(1, len(parts)))
            if in_packages and all(p.isidentifier() for p in parts):
                name = ".".join((package, *parts)).removesuffix(".__init__")
                files[path.relative_to(root).as_posix()] = name
                _PINNED.setdefault(name, path.read_text())
        _PACKAGE_FILES[package] = files
    return _PACKAGE_FILES[package]


class _PinnedLoader:
    """Runs a package module from the source read at the package's import (:func:`snapshot_sources`), and
    remembers that source as the module's, so a digest names exactly the code the process runs, however late
    the module is first imported; a reload reads the disk afresh. Everything else goes to the file loader."""

    def __init__(self, inner, reload: bool):
        self.inner, self.reload = inner, reload

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def create_module(self, spec):
        return None

    def exec_module(self, module) -> None:
        name = module.__name__
        disk = self.inner.get_source(name)
        if self.reload or name not in _PINNED:
            _PINNED[name] = disk
        text = _PINNED[name]
        if text == disk:
            self.inner.exec_module(module)  # the usual path (bytecode cache and any import hook's loader included)
        else:  # edited on disk since the package was imported: run what the process pinned, compiled by that loader
            exec(self.inner.source_to_code(text.encode(), self.inner.path), module.__dict__)
        _remember(module, text)

    def get_source(self, name):
        return _PINNED.get(name) if name in _PINNED else self.inner.get_source(name)


class _PinnedFinder:
    """A ``sys.meta_path`` finder that hands the modules of pinned packages to :class:`_PinnedLoader`."""

    emis_interp_pinned = True

    def __init__(self):
        self.packages: set[str] = set()

    def find_spec(self, name, path, target=None):
        import importlib.machinery
        import sys

        if name.partition(".")[0] not in self.packages or name not in _PINNED:
            return None
        # the spec the other finders give (an import hook's, e.g. jaxtyping's under pytest, keeps its loader inside)
        spec = None
        for finder in sys.meta_path:
            if finder is not self and hasattr(finder, "find_spec"):
                spec = finder.find_spec(name, path, target)
                if spec is not None:
                    break
        if spec is not None and isinstance(spec.loader, importlib.machinery.SourceFileLoader):
            spec.loader = _PinnedLoader(spec.loader, reload=name in sys.modules)
        return spec

    def invalidate_caches(self):
        pass


def snapshot_sources(package: str = "emis_interp") -> None:
    """Read the source of every module of ``package`` now, at the package's import (the first thing its
    ``__init__`` does), and make every module of it that is imported later run that source: so a file edited
    while this process runs changes neither the code it runs nor a digest of it, and modules need not all be
    imported up front. Modules already loaded (this one among them) are read now."""
    import sys

    files = _package_modules(package)
    finder = next((f for f in sys.meta_path if getattr(f, "emis_interp_pinned", False)), None)
    if finder is None:
        finder = _PinnedFinder()
        sys.meta_path.insert(0, finder)
    finder.packages.add(package)
    for name in files.values():
        if name in sys.modules:
            _source(sys.modules[name])


def package_sources(package: str = "emis_interp") -> dict[str, str]:
    """``{file path: digest of its source}`` for the package and every module in it: a loaded module's as loaded
    (a reloaded one as reloaded), one never imported by its source pinned at the package's import
    (:func:`snapshot_sources`), the code it would run. The same digest either way, so a report's key does not depend
    on which modules the caller imported."""
    import sys

    out = {}
    for path, name in _package_modules(package).items():
        mod = sys.modules.get(name)
        out[path] = source_digest(mod) if mod is not None else digest([normalised_source(_PINNED[name])])
    return out


def tensor_digest(t: torch.Tensor, n: int = 16) -> str:
    """Digest of a tensor's dtype, shape and exact bytes."""
    t = t.detach().contiguous().cpu()
    h = hashlib.sha256(f"{t.dtype}{tuple(t.shape)}".encode())
    if t.numel():
        h.update(t.view(torch.uint8).numpy().tobytes() if t.dtype != torch.bool else t.numpy().tobytes())
    return h.hexdigest()[:n]


def file_digest(path: str | Path, n: int = 16, full_limit: int = 256 << 20) -> str:
    """Digest of a file: every byte up to ``full_limit``; beyond that its size and 16 spread 1 MiB blocks."""
    p = Path(path)
    size = p.stat().st_size
    h = hashlib.sha256(str(size).encode())
    with p.open("rb") as f:
        if size <= full_limit:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        else:
            for i in range(16):
                f.seek((size - (1 << 20)) * i // 15)
                h.update(f.read(1 << 20))
    return h.hexdigest()[:n]


def dir_digest(path: str | Path, patterns=("*.json", "*.safetensors", "*.txt", "*.jinja")) -> str:
    """Digest of the files of a model / adapter directory that determine its outputs (top level)."""
    p = Path(path)
    files = sorted({f for pat in patterns for f in p.glob(pat) if f.is_file() and f.name != "trainer_state.json"})
    return digest({f.name: file_digest(f) for f in files})


# --- model, tokenizer and direction state ----------------------------------------------------------


def adapter_state(model) -> dict:
    """The PEFT state that changes a forward pass without changing ``named_parameters``."""
    state: dict = {}
    if hasattr(model, "peft_config"):
        state["active_adapter"] = _canon(getattr(model, "active_adapter", None))
        state["peft_config"] = digest(
            {k: getattr(v, "to_dict", lambda v=v: repr(v))() for k, v in model.peft_config.items()}
        )
    scaling, disabled, merged = {}, False, False
    for name, m in model.named_modules():
        if hasattr(m, "scaling") and isinstance(m.scaling, dict):
            scaling[name] = _canon(m.scaling)
            disabled = disabled or bool(getattr(m, "disable_adapters", False))
            merged = merged or bool(getattr(m, "merged", False))
            act = getattr(m, "active_adapters", None)
            if act is not None:
                scaling[name + ".active"] = _canon(act)
    if scaling:
        state["lora_scaling"] = digest(scaling)
        state["adapters_disabled"] = disabled
        state["adapters_merged"] = merged
    return state


def adapters_disabled(model) -> bool:
    return bool(adapter_state(model).get("adapters_disabled", False))


def tokenizer_state(tokenizer) -> dict:
    """The tokenizer's vocabulary/merges/normaliser and its chat template."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    try:
        spec = backend.to_str() if backend is not None else json.dumps(tokenizer.get_vocab(), sort_keys=True)
    except Exception:  # noqa: BLE001 - a tokenizer without a serialisable backend: vocab and specials
        spec = json.dumps(tokenizer.get_vocab(), sort_keys=True)
    return {
        "tokenizer": digest(spec),
        "chat_template": digest(str(getattr(tokenizer, "chat_template", "") or "")),
        "special": digest([tokenizer.pad_token_id, tokenizer.eos_token_id, getattr(tokenizer, "padding_side", None)]),
    }


def direction_state(direction) -> str | None:
    """Digest of a :class:`PersonaDirection`'s vectors and layers (None for no direction)."""
    if direction is None:
        return None
    return digest({"vectors": direction.vectors.float(), "layers": list(direction.layers)})


# --- the manifest itself -----------------------------------------------------------------------------


@dataclass
class Manifest:
    """What determines one result: ``kind`` (what it is) and ``fields`` (JSON-able values or digests)."""

    kind: str
    fields: dict = field(default_factory=dict)

    def __post_init__(self):
        self.fields = _canon(dict(self.fields))

    @property
    def key(self) -> str:
        return digest({"kind": self.kind, "fields": self.fields}, n=24)

    def to_json(self) -> str:
        return json.dumps({"format": FORMAT, "kind": self.kind, "key": self.key, "fields": self.fields}, indent=1)

    @classmethod
    def from_json(cls, text: str) -> Manifest:
        d = json.loads(text)
        return cls(d["kind"], d["fields"])

    def diff(self, other: Manifest) -> list[str]:
        """Names of the fields that differ (``kind`` included)."""
        out = ["kind"] if self.kind != other.kind else []
        for k in sorted(set(self.fields) | set(other.fields)):
            if self.fields.get(k, "<absent>") != other.fields.get(k, "<absent>"):
                out.append(k)
        return out

    def explain(self, other: Manifest) -> str:
        parts = []
        for k in self.diff(other):
            if k == "kind":
                parts.append(f"kind: {other.kind!r} -> {self.kind!r}")
                continue
            old, new = other.fields.get(k, "<absent>"), self.fields.get(k, "<absent>")
            show = lambda v: s if len(s := json.dumps(v)) <= 60 else s[:57] + "..."  # noqa: E731
            parts.append(f"{k}: {show(old)} -> {show(new)}")
        return "; ".join(parts)


def read_manifest(path: str | Path) -> Manifest | None:
    p = Path(path)
    if p.is_dir():
        p = p / MANIFEST_FILE
    if not p.exists():
        return None
    try:
        return Manifest.from_json(p.read_text())
    except (json.JSONDecodeError, KeyError, TypeError):
        return None


def _manifest_file(path: str | Path) -> Path:
    p = Path(path)
    return p / MANIFEST_FILE if p.is_dir() or not p.suffix else p


def write_manifest(path: str | Path, manifest: Manifest, overrides: list | None = None) -> Path:
    """Write ``manifest`` (and the record of ``allow_code_change`` resumes, if any) atomically."""
    from .cache import atomic_write_text

    text = manifest.to_json()
    if overrides:
        text = json.dumps({**json.loads(text), "overrides": overrides}, indent=1)
    return atomic_write_text(_manifest_file(path), text)


def read_overrides(path: str | Path) -> list:
    """The ``allow_code_change`` resumes recorded in a manifest file (``[]`` if none)."""
    p = _manifest_file(path)
    try:
        return list(json.loads(p.read_text()).get("overrides", []))
    except (OSError, json.JSONDecodeError, AttributeError):
        return []


# fields that name the code and library versions a result was made with (not its inputs or settings): a user who
# knows a change does not alter the numbers may resume across it with allow_code_change (--allow-code-change)
CODE_FIELDS = ("code", "versions")


def code_only_change(existing: Manifest, manifest: Manifest) -> list[str]:
    """The differing fields if all of them are :data:`CODE_FIELDS` (same kind), else ``[]``."""
    diff = existing.diff(manifest)
    return diff if diff and all(f in CODE_FIELDS for f in diff) else []


def override_record(existing: Manifest, manifest: Manifest) -> dict:
    """What an ``allow_code_change`` resume records: the fields, their old and new values, and when."""
    import datetime

    fields = code_only_change(existing, manifest)
    return {
        "allow_code_change": {f: [existing.fields.get(f), manifest.fields.get(f)] for f in fields},
        "at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def check_resumable(
    existing: Manifest | None,
    manifest: Manifest,
    where: str,
    flag: str = "--overwrite",
    allow_code_change: bool = False,
) -> None:
    """Raise :class:`ManifestMismatch` if ``existing`` (a previous run's) differs from ``manifest`` (with
    ``allow_code_change``, a difference in :data:`CODE_FIELDS` alone is accepted; the caller records it)."""
    if existing is None or existing.key == manifest.key:
        return
    if allow_code_change and code_only_change(existing, manifest):
        return
    hint = ""
    if all(f in CODE_FIELDS for f in existing.diff(manifest)):
        hint = (
            " Only the code or library versions differ: if you know the change leaves the numbers unchanged, pass "
            "--allow-code-change (allow_code_change=True) to resume where the entry point offers it (track, "
            "experiments/trajectory.py, experiments/finetune.py); the override is recorded in the manifest."
        )
    raise ManifestMismatch(
        f"{where} holds results made under other settings ({manifest.kind}); fields that differ: "
        f"{existing.diff(manifest) and manifest.explain(existing)}. Resuming would mix them. Pass {flag} "
        f"(overwrite=True) to discard the old results, or choose another output directory.{hint}"
    )


def accept_code_change(out_dir: str | Path, manifest: Manifest) -> bool:
    """``--allow-code-change`` for an output directory: if its ``manifest.json`` differs from ``manifest`` only in
    :data:`CODE_FIELDS`, make ``manifest`` its manifest, append the override to its ``overrides`` and return True
    (a resume then proceeds as for a matching manifest); else change nothing and return False (a settings change,
    or no manifest, is never waved through). :func:`prepare_dir` uses it; so does ``experiments/finetune.py``
    before :func:`emis_interp.finetune.finetune`."""
    existing = read_manifest(out_dir)
    if existing is None or existing.key == manifest.key or not code_only_change(existing, manifest):
        return False
    write_manifest(out_dir, manifest, overrides=[*read_overrides(out_dir), override_record(existing, manifest)])
    return True


def prepare_dir(
    out_dir: str | Path,
    manifest: Manifest,
    overwrite: bool = False,
    flag: str = "--overwrite",
    keep=(),
    allow_code_change: bool = False,
) -> Path:
    """Make ``out_dir`` a resumable output for ``manifest``.

    A new or empty directory gets ``manifest.json``. One whose manifest matches is resumed. One with
    another manifest raises :class:`ManifestMismatch` (naming the fields). With ``overwrite`` the
    directory is always cleared first (except the names in ``keep``), matching or not: it is the
    escape hatch for inputs a manifest cannot see. A non-empty directory with no manifest (made by
    an older release) is treated as a mismatch too: nothing unidentified is resumed. With ``allow_code_change``
    (``--allow-code-change``), a directory whose manifest differs only in :data:`CODE_FIELDS` is resumed: its
    manifest becomes the new one, and ``overrides`` in ``manifest.json`` lists every such resume.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    existing = read_manifest(out)
    contents = [p for p in out.iterdir() if p.name != MANIFEST_FILE and p.name not in keep]
    if existing is not None and existing.key == manifest.key and not overwrite:
        return out
    if allow_code_change and not overwrite and accept_code_change(out, manifest):
        return out
    if contents or existing is not None:
        if not overwrite:
            if existing is None:
                raise ManifestMismatch(
                    f"{out} is not empty but has no {MANIFEST_FILE}: its results cannot be identified. Pass {flag} "
                    "(overwrite=True) to discard them, or choose another output directory."
                )
            check_resumable(existing, manifest, str(out), flag)
        for p in contents:
            shutil.rmtree(p) if p.is_dir() else p.unlink()
    write_manifest(out, manifest)
    return out


def cache_valid(path: str | Path, manifest: Manifest) -> bool:
    """True if the cache entry at ``path`` was made for ``manifest`` (its stored manifest matches)."""
    stored = read_manifest(path)
    return stored is not None and stored.key == manifest.key
