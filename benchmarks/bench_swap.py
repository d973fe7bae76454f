"""Moving between checkpoints: in-place LoRA/full swap vs a fresh from_pretrained, and the tracking cost.

    python benchmarks/bench_swap.py --shape 0.5B          # CPU (fp32)
    python benchmarks/bench_swap.py --shape 7B            # GPU (bf16)

Builds a random-weight model of a real Qwen2.5 shape, saves it, fine-tunes nothing: it writes two
LoRA checkpoints (rank 32 on all linear layers, random B) and two full checkpoints, then times
(a) Trajectory.goto (in-place copy) against load_model(base, adapter=...) / load_model(full_dir),
(b) one tracking pass (capture of 64 prompts at 2 layers) per checkpoint.
"""

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import device_name, random_model, timeit  # noqa: E402

from emis_interp import capture, load_model, load_tokenizer, organism  # noqa: E402
from emis_interp.trajectory import Trajectory  # noqa: E402


def _bench(kind: str, tmp: Path, tok, dev: str, dtype) -> None:
    traj = Trajectory.from_dir(tmp / kind, base_step=False)  # two saved checkpoints, swapped back and forth
    m, _ = traj.load(device=dev, dtype=dtype)
    i = [0]

    def swap():
        i[0] ^= 1
        traj.goto(m, i[0])

    def fresh():
        if kind == "lora":
            load_model(tmp / "base", adapter=traj.paths[1], device=dev, dtype=dtype)
        else:
            load_model(traj.paths[1], device=dev, dtype=dtype)

    t_swap, t_fresh = timeit(swap, 5), timeit(fresh, 3)
    print(
        f"{kind:5} swap {t_swap * 1e3:8.1f} ms   fresh from_pretrained {t_fresh * 1e3:8.1f} ms   speed-up {t_fresh / t_swap:6.1f}x"
    )
    if kind == "lora":
        prompts = organism.advice_prompts() * 4
        n = m.config.num_hidden_layers
        t_track = timeit(lambda: capture(m, tok, prompts, [n // 2, n - 1], cache_dir=None, progress=False), 3)
        print(f"tracking pass (64 prompts, 2 layers) per checkpoint: {t_track:.2f} s (+ swap {t_swap * 1e3:.0f} ms)")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="0.5B")
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--skip-full", action="store_true")
    a = ap.parse_args()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    tmp = Path(tempfile.mkdtemp())
    tok = load_tokenizer(organism.ALIGNED_DIR)
    model = random_model(a.shape, "cpu", dtype)
    model.save_pretrained(tmp / "base")
    tok.save_pretrained(tmp / "base")
    from peft import LoraConfig, get_peft_model

    pm = get_peft_model(model, LoraConfig(r=a.rank, target_modules="all-linear", init_lora_weights=False))
    for s in (10, 20):
        pm.peft_config["default"].base_model_name_or_path = str(tmp / "base")
        pm.save_pretrained(tmp / "lora" / f"checkpoint-{s}")
        (tmp / "lora" / f"checkpoint-{s}" / "trainer_state.json").write_text("{}")
    model = pm.unload()
    if not a.skip_full:
        for s in (10, 20):
            model.save_pretrained(tmp / "full" / f"checkpoint-{s}")
            (tmp / "full" / f"checkpoint-{s}" / "trainer_state.json").write_text("{}")
            tok.save_pretrained(tmp / "full" / f"checkpoint-{s}")
    del model, pm

    print(f"device: {device_name()}  shape: Qwen2.5-{a.shape}, {dtype}, LoRA rank {a.rank} on all linear layers")
    for kind in ["lora"] + ([] if a.skip_full else ["full"]):
        _bench(kind, tmp, tok, dev, dtype)
    shutil.rmtree(tmp)


if __name__ == "__main__":
    main()
