"""The cost of a model's weights digest (what every capture cache key and sampling manifest computes), against the
work it guards (an uncached capture).

    python benchmarks/bench_fingerprint.py --shape 0.5B          # CPU (fp32)
    python benchmarks/bench_fingerprint.py --shape 7B            # GPU (bf16)

Saves a random-weight model of a real Qwen2.5 shape, then times, each in a fresh state:

- before: the old first-call digest, an exact integer checksum of every tensor (``tensor_checksum``);
- in memory: the same model's digest with no record of its files (every tensor hashed, sha256 on the CPU);
- first load: ``load_model`` + digest with no remembered file digests (each file hashed once, sha256);
- later loads: ``load_model`` + digest with the file digests remembered (no tensor read);
- after an in-place edit of one weight (only that tensor is read again);
- the guarded work: one uncached capture (32 prompts, 2 layers).
"""

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import device_name, random_model  # noqa: E402

from emis_interp import capture, load_model, load_tokenizer, organism  # noqa: E402
from emis_interp import fingerprint as M  # noqa: E402


def _t(fn) -> tuple[float, object]:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t = time.perf_counter()
    out = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - t, out


def gguf(path: Path, prompts: int, before: bool) -> None:
    """The real model: a GGUF loaded (dequantized) by transformers, its file recorded with remember_source."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t_load, m = _t(lambda: AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name).eval())
    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    tok.padding_side = "left"
    tok.pad_token = tok.pad_token or tok.eos_token
    n = sum(p.numel() for p in m.parameters())
    print(
        f"device: {device_name()}  model: {path.name} ({n / 1e6:.0f}M parameters, fp32), from_pretrained {t_load:.1f} s"
    )
    t_mem, _ = _t(lambda: M.weights_digest(m))
    print(f"in memory, no record of its file (every tensor hashed): {t_mem:.2f} s")
    m.__dict__.pop("_emis_checksums", None)
    t_rec, _ = _t(lambda: M.remember_source(m, [path]))
    print(f"remember_source (sha256 of the {path.stat().st_size / 2**20:.0f} MiB file, first time): {t_rec:.2f} s")
    t_rec2, _ = _t(lambda: M.remember_source(m, [path]))
    t_dig, _ = _t(lambda: M.weights_digest(m))
    print(f"later processes: remember_source {t_rec2:.3f} s + digest {t_dig:.3f} s")
    if before:
        t_old, _ = _t(lambda: [M.tensor_checksum(p) for p in m.parameters()])
        print(f"before (integer checksum of every tensor): {t_old:.1f} s")
    if tok.chat_template:
        convs = (organism.advice_prompts() * 8)[:prompts]
        t_cap, _ = _t(lambda: capture(m, tok, convs, [12, 23], cache_dir=None, progress=False))
        print(f"guarded work: one uncached capture ({len(convs)} prompts, 2 layers): {t_cap:.2f} s; "
              f"digest / capture: later processes {(t_rec2 + t_dig) / t_cap:.2%}, in memory {t_mem / t_cap:.1%}")  # fmt: skip


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="0.5B")
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--skip-before", action="store_true", help="skip the slow old checksum")
    ap.add_argument("--gguf", type=Path, help="time the real model instead: a GGUF file (a tokenizer beside it)")
    a = ap.parse_args()
    if a.gguf:
        return gguf(a.gguf, a.prompts, not a.skip_before)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    tmp = Path(tempfile.mkdtemp())
    cache = tmp / "cache"
    M_cache = str(cache)
    tok = load_tokenizer(organism.ALIGNED_DIR)
    model = random_model(a.shape, "cpu", dtype)
    model.save_pretrained(tmp / "model")
    tok.save_pretrained(tmp / "model")
    del model
    n_params = None
    import emis_interp.cache as C

    C.DEFAULT_CACHE_DIR = cache  # the file-digest sidecar lives here, fresh
    print(f"device: {device_name()}  shape: Qwen2.5-{a.shape}, {dtype}")

    t_load, (m, _) = _t(lambda: load_model(tmp / "model", device=dev, dtype=dtype))
    n_params = sum(p.numel() for p in m.parameters())
    size = sum(f.stat().st_size for f in (tmp / "model").glob("*.safetensors"))
    print(f"{n_params / 1e6:.0f}M parameters, {size / 2**30:.2f} GiB of safetensors; load_model {t_load:.1f} s")
    print(f"first load: hashing the files (once, remembered in {M.FILE_DIGESTS}) was part of load_model above")
    t_first, d0 = _t(lambda: M.weights_digest(m))
    print(f"digest right after the first load (no tensor read): {t_first:.3f} s")
    shutil.rmtree(cache)
    t_cold, _ = _t(lambda: M.content_digest(next((tmp / "model").glob("*.safetensors")), M_cache))
    print(f"sha256 of the weights file (cold sidecar): {t_cold:.2f} s")
    t_load2, loaded = _t(lambda: load_model(tmp / "model", device=dev, dtype=dtype))
    m2 = loaded[0]
    t_warm, d1 = _t(lambda: M.weights_digest(m2))
    assert d1 == d0
    print(f"later process: load_model {t_load2:.1f} s, digest {t_warm:.3f} s (file digests remembered)")
    with torch.no_grad():
        m2.model.layers[0].mlp.up_proj.weight[0, 0] += 1
    t_edit, d2 = _t(lambda: M.weights_digest(m2))
    assert d2 != d0
    print(f"after an in-place edit of one weight matrix: {t_edit:.3f} s (that tensor re-read)")
    m2 = loaded = None  # freed
    m.__dict__.pop("_emis_source")
    m.__dict__.pop("_emis_checksums", None)
    t_mem, _ = _t(lambda: M.weights_digest(m))
    print(f"in memory, no record of its files (every tensor hashed): {t_mem:.2f} s")
    if not a.skip_before:
        t_old, _ = _t(lambda: [M.tensor_checksum(p) for p in m.parameters()])
        print(f"before (integer checksum of every tensor, the old first-call digest): {t_old:.2f} s")
    prompts = (organism.advice_prompts() * 8)[: a.prompts]
    n = m.config.num_hidden_layers
    t_cap, _ = _t(lambda: capture(m, tok, prompts, [n // 2, n - 1], cache_dir=None, progress=False))
    print(f"guarded work: one uncached capture ({len(prompts)} prompts, 2 layers): {t_cap:.2f} s")
    print(f"digest / capture: later loads {t_warm / t_cap:.2%}, in memory {t_mem / t_cap:.1%}", end="")
    print(f", before {t_old / t_cap:.0%}" if not a.skip_before else "")
    shutil.rmtree(tmp)


if __name__ == "__main__":
    main()
