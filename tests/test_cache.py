import pytest
import torch

from emis_interp import capture
from emis_interp.cache import CorruptCacheError, atomic_save, verified_load


def test_roundtrip_and_hit(tiny, convs, tmp_path):
    model, tok = tiny
    a = capture(model, tok, convs, [0, 1], "mean_response", cache_dir=tmp_path)
    b = capture(model, tok, convs, [0, 1], "mean_response", cache_dir=tmp_path)
    assert not a.meta["cache_hit"] and b.meta["cache_hit"]
    torch.testing.assert_close(a.acts, b.acts, rtol=0, atol=0)
    c = capture(model, tok, convs, [0, 1], "mean_prompt", cache_dir=tmp_path)
    assert not c.meta["cache_hit"]  # reduction is part of the key


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_corrupt_file_is_recomputed(tiny, convs, tmp_path, damage):
    model, tok = tiny
    a = capture(model, tok, convs, [1], cache_dir=tmp_path)
    (f,) = list((tmp_path / "acts").glob("*.safetensors"))
    raw = f.read_bytes()
    if damage == "truncate":
        f.write_bytes(raw[: len(raw) // 2])
    else:
        f.write_bytes(raw[:-8] + bytes(b ^ 0xFF for b in raw[-8:]))
    with pytest.raises(CorruptCacheError):
        verified_load(f)
    with pytest.warns(UserWarning, match="corrupt"):
        b = capture(model, tok, convs, [1], cache_dir=tmp_path)
    assert not b.meta["cache_hit"]
    torch.testing.assert_close(a.acts, b.acts)
    verified_load(f)


def test_atomic_save_leaves_no_partial_on_error(tmp_path):
    t = torch.zeros(4)
    with pytest.raises(RuntimeError, match="share memory"):  # save_file fails after the temp file exists
        atomic_save({"a": t, "b": t}, tmp_path / "x.safetensors")
    assert list(tmp_path.iterdir()) == []


def test_no_pickle_anywhere():
    import pathlib

    root = pathlib.Path(__file__).resolve().parents[1]
    for f in list((root / "emis_interp").glob("*.py")) + list((root / "experiments").glob("*.py")):
        text = f.read_text()
        assert "pickle.load(" not in text and "torch.load(" not in text, f
