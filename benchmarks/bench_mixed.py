"""Sampling every checkpoint of a LoRA trajectory: one mixed-adapter batch vs swapping checkpoints.

    python benchmarks/bench_mixed.py                                   # the organism's insecure run (CPU)
    python benchmarks/bench_mixed.py --shape 0.5B --vocab 1024 --prompts 4 --max-new-tokens 8
    python benchmarks/bench_mixed.py --shape 7B                        # GPU (bf16)

Greedy answers to ``--prompts`` prompts from each of ``--checkpoints`` checkpoints (the same rows
and exactly ``--max-new-tokens`` new tokens in every way: ``min_new_tokens`` is set):

- sequential swap: ``Trajectory.goto`` + ``generate`` per checkpoint (a PeftModel; one call per
  checkpoint, ``--prompts`` rows each: all a checkpoint has);
- bank, one checkpoint per call: the base model under a LoraBank, the same calls as the swap
  (isolates the bank's cost from batching);
- bank, all checkpoints mixed: one ``generate`` over every row, each row through its checkpoint's
  adapter (emis_interp.lora_bank);
- bank, per-row gathered weights: the same, with ``A[idx]``/``B[idx]`` gathered per row (the naive
  kernel the bank's grouping replaces);
- PEFT mixed batch: ``PeftModel.generate(adapter_names=[...])`` with every adapter loaded;
- plain base model: the same big batch without any adapter (the floor; its tokens differ).

Without ``--shape`` it samples the model organism's ``insecure-s0`` run (built and cached by
``organism_trajectory``, ~20 s the first time), checkpoints 10..200. With ``--shape`` it writes
random-weight LoRA checkpoints (rank ``--rank`` on all linear modules, random non-zero B) of a
random-weight Qwen2.5 model of that shape; ``--vocab`` shrinks the vocabulary (memory). Results
go to ``benchmarks/results/bench_mixed_<model>.json`` (``--no-save``: print only).
"""

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import device_name, qwen_config  # noqa: E402

import emis_interp.interventions as _iv  # noqa: E402
from emis_interp import load_model, load_tokenizer, make_batch, organism  # noqa: E402
from emis_interp.lora_bank import LoraBank  # noqa: E402
from emis_interp.trajectory import Trajectory  # noqa: E402

RESULTS = Path(__file__).parent / "results"


def gathered_rows(out, x, A, B, plan):
    """The naive kernel: every row's own weights gathered (``A[idx]``: batch x d_in x r per module)."""
    idx = torch.zeros(plan.n_rows, dtype=torch.long)
    if plan.start is not None:
        idx[plan.start : plan.start + len(plan.adapters) * plan.m] = torch.tensor(plan.adapters).repeat_interleave(
            plan.m
        )
    elif plan.adapters:
        slots = plan.slots if plan.slots is not None else range(len(plan.rows))
        idx[torch.tensor(plan.rows)] = torch.tensor([plan.adapters[s // plan.m] for s in slots])
    idx = idx.to(x.device)
    n = x.shape[0]
    d = torch.bmm(torch.bmm(x.reshape(n, -1, x.shape[-1]), A[idx]), B[idx])
    return out + d.reshape(out.shape).to(out.dtype)


def random_run(shape: str, vocab: int | None, n_ckpts: int, rank: int, tmp: Path, tok, dev, dtype) -> Path:
    """A random-weight base model and ``n_ckpts`` random LoRA checkpoints under ``tmp/run``."""
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen2ForCausalLM

    cfg = qwen_config(shape)
    if vocab:
        cfg.vocab_size = vocab
    cfg.pad_token_id, cfg.eos_token_id = tok.pad_token_id, tok.convert_tokens_to_ids("<|im_end|>")
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(cfg).to(dtype).eval()
    model.save_pretrained(tmp / "base")
    tok.save_pretrained(tmp / "base")
    pm = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules="all-linear"))
    pm.peft_config["default"].base_model_name_or_path = str(tmp / "base")
    g = torch.Generator().manual_seed(1)
    for k in range(1, n_ckpts + 1):
        with torch.no_grad():
            for name, p in pm.named_parameters():
                if "lora_B" in name:  # A keeps PEFT's random init; B grows along the run
                    p.copy_((torch.randn(p.shape, generator=g) * 0.02 * k / n_ckpts).to(p.dtype))
        out = tmp / "run" / f"checkpoint-{10 * k}"
        pm.save_pretrained(out)
        (out / "trainer_state.json").write_text("{}")
    del pm, model
    return tmp / "run"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default=None, help="random-weight Qwen2.5 shape instead of the organism")
    ap.add_argument("--vocab", type=int, default=None, help="vocabulary size for --shape (default: the real one)")
    ap.add_argument("--rank", type=int, default=32, help="LoRA rank for --shape")
    ap.add_argument("--checkpoints", type=int, default=20)
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=24)
    ap.add_argument("--repeat", type=int, default=1, help="timed runs per way (median)")
    ap.add_argument("--skip", nargs="*", default=[], help="ways to skip: swap bank1 mixed gathered peft plain")
    ap.add_argument("--no-save", action="store_true")
    a = ap.parse_args()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    tok = load_tokenizer(organism.ALIGNED_DIR)
    tmp = Path(tempfile.mkdtemp())
    try:
        if a.shape:
            run = random_run(a.shape, a.vocab, a.checkpoints, a.rank, tmp, tok, dev, dtype)
            label = f"Qwen2.5-{a.shape} shape, random weights" + (f", vocab {a.vocab}" if a.vocab else "")
            label += f", LoRA r={a.rank} all linear"
        else:
            run = organism.organism_trajectory("insecure", 0)
            label = "organism insecure-s0 (d_model 128, 4 layers, LoRA r=1 all linear)"
        traj = Trajectory.from_dir(run)
        saved = [(i, s, p) for i, (s, p) in enumerate(zip(traj.steps, traj.paths, strict=True)) if s > 0]
        saved = saved[-a.checkpoints :]
        if len(saved) < a.checkpoints:
            raise SystemExit(f"{run} has {len(saved)} checkpoints after step 0; asked for {a.checkpoints}")
        names = [f"step-{s}" for _, s, _ in saved]
        prompts = organism.advice_prompts()
        prompts = (prompts * (a.prompts // len(prompts) + 1))[: a.prompts]
        gen = dict(
            max_new_tokens=a.max_new_tokens,
            min_new_tokens=a.max_new_tokens,
            do_sample=False,
            temperature=None,
            top_p=None,
            top_k=None,
            pad_token_id=tok.pad_token_id,
        )
        rows = len(names) * len(prompts)
        n_tokens = rows * a.max_new_tokens
        one = make_batch(tok, prompts).to(dev)
        every = make_batch(tok, [p for _ in names for p in prompts]).to(dev)
        row_names = [n for n in names for _ in prompts]

        def generate(model, b, **kw):
            with torch.no_grad():
                return model.generate(input_ids=b.input_ids, attention_mask=b.attention_mask, **gen, **kw)

        base_path = traj.base
        plain, _ = load_model(base_path, device=dev, dtype=dtype)
        bank = LoraBank.from_checkpoints(plain, {n: p for n, (_, _, p) in zip(names, saved, strict=True)})
        pm, _ = traj.load(device=dev, dtype=dtype)

        def swap():
            outs = []
            for i, _, _ in saved:
                traj.goto(pm, i)
                outs.append(generate(pm, one))
            return outs

        def bank_one():
            outs = []
            for n in names:
                with bank.attach(plain, [n] * len(prompts)):
                    outs.append(generate(plain, one))
            return outs

        def floor():
            return [generate(plain, every)]

        def mixed():
            with bank.attach(plain, row_names):
                return [generate(plain, every)]

        def gathered():
            orig = _iv.apply_rows
            _iv.apply_rows = gathered_rows
            try:
                return mixed()
            finally:
                _iv.apply_rows = orig

        peft = None

        def peft_mixed():
            return [generate(peft, every, adapter_names=row_names)]

        ways = {
            "swap": ("sequential swap (Trajectory.goto + generate)", swap, len(prompts)),
            "bank1": ("bank, one checkpoint per call", bank_one, len(prompts)),
            "mixed": ("bank, all checkpoints mixed in one batch", mixed, rows),
            "gathered": ("bank mixed, per-row gathered weights", gathered, rows),
            "peft": ("PEFT mixed batch (adapter_names)", peft_mixed, rows),
            "plain": ("plain base model, no adapters (the floor)", floor, rows),
        }
        print(
            f"device: {device_name()}  model: {label}, {dtype}\n"
            f"{len(names)} checkpoints x {len(prompts)} prompts = {rows} rows, {a.max_new_tokens} greedy new tokens "
            f"each; bank {bank.nbytes() / 2**20:.1f} MiB"
        )
        ways = {k: v for k, v in ways.items() if k not in a.skip}
        if "peft" in ways:
            from peft import PeftModel
            from transformers import AutoModelForCausalLM

            base = AutoModelForCausalLM.from_pretrained(base_path, dtype=dtype).to(dev).eval()
            peft = PeftModel.from_pretrained(base, saved[0][2], adapter_name=names[0])
            for n, (_, _, p) in zip(names[1:], saved[1:], strict=True):
                peft.load_adapter(p, adapter_name=n)
        generate(plain, one)  # warm-up, untimed
        load_before = os.getloadavg()[0]
        times: dict[str, list[float]] = {k: [] for k in ways}
        tokens = {}
        for _ in range(a.repeat):  # round robin: load from other processes hits every way alike
            for key, (_, fn, _) in ways.items():
                t = time.perf_counter()
                outs = fn()
                times[key].append(time.perf_counter() - t)
                tokens[key] = torch.cat([o[:, -a.max_new_tokens :] for o in outs]).cpu()
        load_after = os.getloadavg()[0]
        print(f"1-min load average before/after the timed runs: {load_before:.2f} / {load_after:.2f}")
        results = {}
        for key, (title, _, per_call) in ways.items():
            dt = sorted(times[key])[len(times[key]) // 2]
            results[key] = {
                "way": title,
                "rows_per_call": per_call,
                "seconds": dt,
                "seconds_all_runs": times[key],
                "new_tok_per_s": n_tokens / dt,
            }
        ref = tokens.get("swap")
        print(f"\n{'way':48} {'rows/call':>9} {'seconds':>9} {'new tok/s':>10} {'vs swap':>8} {'same tokens':>12}")
        for key, r in results.items():
            same = "" if ref is None else f"{int((tokens[key] == ref).all(1).sum())}/{rows}"
            r["rows_same_tokens_as_swap"] = same
            ratio = results["swap"]["seconds"] / r["seconds"] if "swap" in results else float("nan")
            r["speedup_vs_swap"] = ratio
            print(
                f"{r['way']:48} {r['rows_per_call']:>9} {r['seconds']:>9.2f} {r['new_tok_per_s']:>10.0f} "
                f"{ratio:>7.2f}x {same:>12}"
            )
        if not a.no_save:
            RESULTS.mkdir(exist_ok=True)
            out = RESULTS / f"bench_mixed_{a.shape or 'organism'}.json"
            meta = {
                "device": device_name(),
                "model": label,
                "dtype": str(dtype),
                "checkpoints": len(names),
                "prompts": len(prompts),
                "max_new_tokens": a.max_new_tokens,
                "repeat": a.repeat,
                "bank_mib": bank.nbytes() / 2**20,
                "torch": torch.__version__,
                "date": time.strftime("%Y-%m-%d"),
                "load_average_before_after": [load_before, load_after],
            }
            out.write_text(json.dumps({"settings": meta, "results": results}, indent=1) + "\n")
            print(f"\nresults: {out}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
