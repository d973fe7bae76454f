"""Sampling throughput of a steering sweep: one batched sweep vs a loop of plain HF generate calls.

    python benchmarks/bench_sampling.py                    # the model organism (CPU)
    python benchmarks/bench_sampling.py --shape 7B         # random weights, real shape (GPU)

The sweep has 9 arms (baseline, 4 alphas x persona/random) over 16 prompts x N samples.
Baseline: for each arm, HF generate at batch 16 with the steering hook (the usual loop).
emis_interp: sample_answers with every arm in the same batch (per-row interventions), batch 256,
optionally with HF's static KV cache. Both generate exactly max_new_tokens (no early EOS) so the
token counts match.
"""

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import device_name, random_model  # noqa: E402

from emis_interp import PersonaDirection, load_model, make_batch, organism, steer  # noqa: E402
from emis_interp.causality import steering_arms  # noqa: E402
from emis_interp.sampling import rowwise  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default=None, help="random-weight Qwen2.5 shape instead of the organism")
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=24)
    ap.add_argument("--big-batch", type=int, default=256)
    a = ap.parse_args()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    model, tok = load_model(organism.ALIGNED_DIR, device=dev)
    if a.shape:
        model = random_model(a.shape, dev, dtype)
    d = PersonaDirection(torch.randn(1, model.config.hidden_size), [model.config.num_hidden_layers // 2])
    arms = steering_arms(d, [-4, -2, 2, 4])
    prompts = organism.advice_prompts()
    gen = dict(
        max_new_tokens=a.max_new_tokens,
        min_new_tokens=a.max_new_tokens,
        do_sample=True,
        top_k=0,
        pad_token_id=tok.pad_token_id,
    )
    n_tokens = len(arms) * len(prompts) * a.samples * a.max_new_tokens

    def loop():
        for arm in arms:
            rows = [p for p in prompts for _ in range(a.samples)]
            for s in range(0, len(rows), 16):
                b = make_batch(tok, rows[s : s + 16]).to(dev)
                ctx = steer(model, arm.direction, arm.alpha) if arm.kind == "steer" else torch.no_grad()
                with torch.no_grad(), ctx:
                    model.generate(input_ids=b.input_ids, attention_mask=b.attention_mask, **gen)

    def batched(cache_implementation=None):
        rows = [(arm, p) for arm in arms for p in prompts for _ in range(a.samples)]
        for s in range(0, len(rows), a.big_batch):
            chunk = rows[s : s + a.big_batch]
            b = make_batch(tok, [p for _, p in chunk]).to(dev)
            kw = dict(gen, cache_implementation=cache_implementation) if cache_implementation else gen
            with torch.no_grad(), rowwise(model, [arm for arm, _ in chunk]):
                model.generate(input_ids=b.input_ids, attention_mask=b.attention_mask, **kw)

    print(
        f"device: {device_name()}  model: {a.shape or 'organism'}  {len(arms)} arms x {len(prompts)} prompts x {a.samples} samples x {a.max_new_tokens} tokens"
    )
    for name, fn in (("HF generate, per arm, batch 16", loop), (f"emis_interp batched sweep, batch {a.big_batch}", batched),
                     (f"emis_interp batched sweep, batch {a.big_batch}, static cache", lambda: batched("static"))):  # fmt: skip
        torch.manual_seed(0)
        t = time.perf_counter()
        fn()
        dt = time.perf_counter() - t
        print(f"{name:58} {n_tokens / dt:>9.0f} new tok/s  ({dt:.1f} s)")


if __name__ == "__main__":
    main()
