"""Capture overhead against a plain HF forward at the same batch (random weights, real Qwen2.5 shape).

    python benchmarks/bench_capture.py --shape 7B --batch 16 --seq 512      # GPU, bf16 (the issue's target)
    python benchmarks/bench_capture.py --shape 0.5B --batch 4 --seq 128     # CPU

Rows: HF forward (logits), HF forward with output_hidden_states, and capture of every layer
(so no early stop helps) by each backend; plus the default torch capture of one middle layer,
which stops the forward after that layer.
"""

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import device_name, random_model, timeit  # noqa: E402

from emis_interp.capture import run_backend  # noqa: E402
from emis_interp.conversations import Batch  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="0.5B")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--layers", type=int, default=None, help="truncate the model (CPU)")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--backends", nargs="+", default=["torch", "nnsight", "transformer_lens"])
    a = ap.parse_args()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    model = random_model(a.shape, dev, dtype, a.layers)
    n = model.config.num_hidden_layers
    ids = torch.randint(0, 1000, (a.batch, a.seq), device=dev)
    att = torch.ones_like(ids)
    b = Batch(ids, att, att.bool(), torch.zeros_like(att, dtype=torch.bool))
    from emis_interp import load_tokenizer, organism

    tok = load_tokenizer(organism.ALIGNED_DIR)  # any tokenizer: the backends only need one to wrap the model
    tokens = a.batch * a.seq

    def hf():
        with torch.no_grad():
            model(input_ids=ids, attention_mask=att, use_cache=False)

    def hf_hidden():
        with torch.no_grad():
            model(input_ids=ids, attention_mask=att, use_cache=False, output_hidden_states=True)

    def hf_body():
        with torch.no_grad():
            model.model(input_ids=ids, attention_mask=att, use_cache=False)

    rows = [
        ("HF forward (logits)", timeit(hf, a.repeat)),
        ("HF forward + hidden_states", timeit(hf_hidden, a.repeat)),
        ("HF decoder only (no lm_head)", timeit(hf_body, a.repeat)),
    ]
    for backend in a.backends:
        rows.append(
            (
                f"capture all {n} layers: {backend}",
                timeit(lambda b_=backend: run_backend(model, tok, b, list(range(n)), b_), a.repeat),
            )
        )
    rows.append(
        (f"capture layer {n // 2} (torch, early stop)", timeit(lambda: run_backend(model, tok, b, [n // 2]), a.repeat))
    )
    ref = rows[0][1]
    print(f"device: {device_name()}  shape: Qwen2.5-{a.shape} ({n} layers), {dtype}, batch {a.batch} x {a.seq}")
    body = rows[2][1]
    print(f"{'':44}{'tok/s':>10}{'vs HF':>9}{'vs decoder':>12}")
    for name, t in rows:
        print(f"{name:44}{tokens / t:>10.0f}{(ref / t - 1) * 100:>+8.1f}%{(body / t - 1) * 100:>+11.1f}%")


if __name__ == "__main__":
    main()
