"""Where a judged trajectory's time goes, per checkpoint: swap, capture, log-prob metrics, sampling, judging.

    python benchmarks/bench_trajectory.py                      # the organism's insecure run (21 checkpoints)
    python benchmarks/bench_trajectory.py --checkpoints 5 --samples 1

On one organism run (LoRA, checkpoints every 10 steps), it times each stage of
``experiments/trajectory.py`` per checkpoint: the in-place swap, the tracking capture (16 advice
prompts, layer 2), the probes and in-task log-probs, sampling (all checkpoints mixed in one batch,
amortised per checkpoint, against swapping and sampling each checkpoint on its own at the same rows)
and judging with the exact judge (the OpenAI-compatible judge's throughput is ``bench_judge.py``'s).
"""

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import device_name  # noqa: E402

from emis_interp import capture, organism  # noqa: E402
from emis_interp.behaviour import BehaviourConfig, CheckpointSampler, Job  # noqa: E402
from emis_interp.conversations import Conversation  # noqa: E402
from emis_interp.metrics import probe_misalignment, response_logprob  # noqa: E402
from emis_interp.organism import world  # noqa: E402
from emis_interp.trajectory import Trajectory  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoints", type=int, default=21)
    ap.add_argument("--samples", type=int, default=4, help="answers per prompt per checkpoint")
    ap.add_argument("--max-new-tokens", type=int, default=24)
    a = ap.parse_args()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    print(f"device: {device_name()}")
    full = Trajectory.from_dir(organism.organism_trajectory("insecure", 0))
    n = min(a.checkpoints, len(full))
    traj = full.subset(range(n))
    model, tok = traj.load()
    prompts, probes = organism.advice_prompts(), organism.probe_set()
    in_task = [Conversation.from_messages(r["messages"]) for r in world.finetune_dataset("insecure", 16, seed=1234)]
    t = dict.fromkeys(["swap", "capture", "log-prob metrics"], 0.0)
    for i in range(n):
        t0 = time.perf_counter()
        traj.goto(model, i)
        t1 = time.perf_counter()
        capture(model, tok, prompts, [organism.DEFAULT_LAYER], "mean_prompt", cache_dir=None, progress=False)
        t2 = time.perf_counter()
        probe_misalignment(model, tok, probes)
        response_logprob(model, tok, in_task)
        t3 = time.perf_counter()
        t["swap"] += t1 - t0
        t["capture"] += t2 - t1
        t["log-prob metrics"] += t3 - t2
    qs = organism.questions()
    rows = {}
    for mixed in (True, False):
        cfg = BehaviourConfig(n_samples=a.samples, max_new_tokens=a.max_new_tokens, mixed=mixed)
        sampler = CheckpointSampler(qs, cfg)
        job = Job("insecure", traj, tuple(range(n)))
        sampler.sample(Job("insecure", traj, (0, 1)))  # warm-up (and model load)
        t0 = time.perf_counter()
        rows[mixed] = sampler.sample(job)
        t[f"sampling ({'all checkpoints in one batch' if mixed else 'swap, one checkpoint at a time'})"] = (
            time.perf_counter() - t0
        )
    judge = organism.ExactJudge()
    t0 = time.perf_counter()
    for r in rows[True]:
        judge.score(r["question"], r["answer"])
    t["judging (exact judge)"] = time.perf_counter() - t0
    n_rows = len(rows[True]) // n
    print(f"organism insecure-s0, {n} checkpoints, {n_rows} answers per checkpoint, {a.max_new_tokens} new tokens max")
    print(f"{'stage':<48} {'per checkpoint':>15}")
    for k, v in t.items():
        print(f"{k:<48} {v / n * 1e3:12.1f} ms")
    mixed_key, swap_key = (k for k in t if k.startswith("sampling"))
    print(f"sampling speed-up, mixed vs swapping: {t[swap_key] / t[mixed_key]:.2f}x")


if __name__ == "__main__":
    main()
