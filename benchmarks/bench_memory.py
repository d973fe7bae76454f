"""Peak memory of the bounded-memory paths against the ones they replaced (issue 25, item 9), on CPU.

    python benchmarks/bench_memory.py                       # 0.5B, 7B and 32B shapes
    python benchmarks/bench_memory.py --shapes tiny --ckpts 4 --batch 2 --seq 8   # smoke run

Method: every measurement runs in its own subprocess. It builds its inputs (random weights, real Qwen2.5
hidden sizes, heads and LoRA module shapes, rank 32), records ``ru_maxrss`` (peak RSS), runs one path once,
and reports the peak RSS reached above the post-setup level: the path's own transient memory.

- ``apply_rows`` (one LoRA'd MLP up-projection, d_model -> intermediate, bf16 activations, fp32 bank,
  half the rows base-model rows) and ``apply_heads`` (ablating two heads' writes at one layer) are per
  module/layer calls: their peak does not grow with the number of layers.
- ``lora_dynamics`` reads a fake rank-32 run of ``--ckpts`` checkpoints (all linear modules, bf16 files)
  cut to 1 and to 2 decoder layers; the peak is extrapolated linearly to the model's layer count:
  ``peak(L) = peak(1) + max(0, peak(2) - peak(1)) * (L - 1)``.
- The LoRA bank of one trajectory job and the models alive in experiments/trajectory.py are computed
  exactly from the shapes (bytes of the tensors held), not measured.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's emis_interp
from common import SHAPES  # noqa: E402

RANK = 32


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _module_shapes(shape: str) -> dict[str, tuple[int, int]]:
    """``{module: (d_in, d_out)}`` of one Qwen2.5 decoder layer's linear modules."""
    h, i, _, a, kv, _ = SHAPES[shape]
    hd = h // a
    return {
        "self_attn.q_proj": (h, h), "self_attn.k_proj": (h, kv * hd), "self_attn.v_proj": (h, kv * hd),
        "self_attn.o_proj": (h, h), "mlp.gate_proj": (h, i), "mlp.up_proj": (h, i), "mlp.down_proj": (i, h),
    }  # fmt: skip


# --- the old paths, kept here only to measure them ------------------------------------------------------


def old_apply_rows(out, x, A, B, plan):
    from emis_interp.lora_bank import apply_rows

    return apply_rows(out.to(A.dtype), x.to(A.dtype), A, B, plan).to(out.dtype)


def old_apply_heads(iv, layer, z, out, o_proj, n_heads):
    from emis_interp.attribution import head_writes, o_proj_weight, parse_component
    from emis_interp.interventions import project_out

    heads = [(parse_component(c, n_heads), c) for (lay, c) in iv.project_components if lay == layer]
    writes = head_writes(z, o_proj_weight(o_proj).to(out.dtype), n_heads)
    for h, c in heads:
        w = writes[:, :, h]
        out = out - (w - project_out(w, iv._on(("comp", (layer, c)), out)))
    return out


def old_lora_dynamics(path):
    from emis_interp.adapters import read_adapter

    run = sorted(Path(path).glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    ads = [read_adapter(p) for p in run]
    mods = list(ads[0])
    v = torch.stack([torch.cat([ad[m][1].flatten() for m in mods]) for ad in ads]).double()
    centred = v - v.mean(0, keepdim=True)
    torch.linalg.svd(centred, full_matrices=False)


# --- one measurement (in its own process) -----------------------------------------------------------------


def _write_run(root: Path, shape: str, layers: int, ckpts: int) -> None:
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    for c in range(1, ckpts + 1):
        d = root / f"checkpoint-{10 * c}"
        d.mkdir(parents=True)
        sd = {}
        for layer in range(layers):
            for m, (d_in, d_out) in _module_shapes(shape).items():
                k = f"base_model.model.model.layers.{layer}.{m}"
                sd[f"{k}.lora_A.weight"] = torch.randn(RANK, d_in, generator=g, dtype=torch.bfloat16)
                sd[f"{k}.lora_B.weight"] = torch.randn(d_out, RANK, generator=g, dtype=torch.bfloat16)
        save_file(sd, str(d / "adapter_model.safetensors"))
        (d / "adapter_config.json").write_text(json.dumps({"r": RANK, "lora_alpha": 64, "use_rslora": True}))


def measure(path: str, mode: str, shape: str, a) -> dict:
    from emis_interp.lora_bank import RowPlan, apply_rows

    torch.set_num_threads(1)
    h, inter, _, n_heads, _, _ = SHAPES[shape]
    g = torch.Generator().manual_seed(0)
    if path == "apply_rows":
        n_ad = 8
        ids = [0] * (a.batch // 2) + [1 + (b * n_ad) // (a.batch - a.batch // 2) for b in range(a.batch - a.batch // 2)]
        plan = RowPlan.build(torch.tensor(ids))
        A = torch.randn(n_ad + 1, h, RANK, generator=g)
        B = torch.randn(n_ad + 1, RANK, inter, generator=g)
        x = torch.randn(a.batch, a.seq, h, generator=g, dtype=torch.bfloat16)
        out = torch.randn(a.batch, a.seq, inter, generator=g, dtype=torch.bfloat16)
        fn = (lambda: old_apply_rows(out, x, A, B, plan)) if mode == "old" else (lambda: apply_rows(out, x, A, B, plan))
    elif path == "apply_heads":
        from emis_interp.interventions import Intervention

        o_proj = torch.nn.Linear(h, h, bias=False).to(torch.bfloat16).requires_grad_(False)
        u = torch.randn(2, h, generator=g)
        iv = Intervention(project_components={(0, "H1"): u[0] / u[0].norm(), (0, "H3"): u[1] / u[1].norm()})
        z = torch.randn(a.batch, a.seq, h, generator=g, dtype=torch.bfloat16)
        out = torch.randn(a.batch, a.seq, h, generator=g, dtype=torch.bfloat16)
        with torch.no_grad():
            if mode == "old":
                fn = lambda: old_apply_heads(iv, 0, z, out, o_proj, n_heads)  # noqa: E731
            else:
                fn = lambda: iv.apply_heads(0, z, out, o_proj, n_heads)  # noqa: E731
    elif path == "lora_dynamics":
        from emis_interp.weights import lora_dynamics

        tmp = Path(tempfile.mkdtemp(prefix="benchmem-"))
        _write_run(tmp / "run", shape, a.cut_layers, a.ckpts)
        if mode == "old":
            fn = lambda: old_lora_dynamics(tmp / "run")  # noqa: E731
        else:
            from emis_interp.trajectory import Trajectory

            traj = Trajectory.from_dir(tmp / "run", base="x")
            fn = lambda: lora_dynamics(traj)  # noqa: E731
    else:
        raise SystemExit(f"unknown path {path}")
    before = _peak_mb()
    with torch.no_grad():
        fn()
    res = {"peak_above_setup_mb": max(0.0, _peak_mb() - before)}
    if path == "lora_dynamics":
        import shutil

        shutil.rmtree(tmp)
    return res


def run_one(path, mode, shape, a, cut_layers=None) -> float:
    cmd = [sys.executable, __file__, "--measure", path, mode, shape, "--batch", str(a.batch), "--seq", str(a.seq),
           "--ckpts", str(a.ckpts), "--cut-layers", str(cut_layers or 1)]  # fmt: skip
    r = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(r.stdout.strip().splitlines()[-1])["peak_above_setup_mb"]


def bank_gb(shape: str, ckpts: int) -> float:
    """One trajectory job's LoRA bank (fp32, rank 32, all linear modules) holding ``ckpts`` checkpoints."""
    per_layer = sum(RANK * (d_in + d_out) for d_in, d_out in _module_shapes(shape).values())
    return 4 * per_layer * SHAPES[shape][2] * ckpts / 1e9


def model_gb(shape: str) -> float:
    """bf16 weights of the model (embedding and untied lm_head included for 7B/32B)."""
    h, i, n, a, kv, v = SHAPES[shape]
    hd = h // a
    layer = h * h * 2 + 2 * h * kv * hd + 3 * h * i + (h + 2 * kv * hd)
    emb = v * h * (1 if shape in ("0.5B", "1.5B") else 2)
    return 2 * (n * layer + emb) / 1e9


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="+", default=["0.5B", "7B", "32B"], help="Qwen2.5 shapes (common.SHAPES)")
    ap.add_argument("--batch", type=int, default=16, help="rows of the apply_rows/apply_heads activations")
    ap.add_argument("--seq", type=int, default=256, help="positions of the apply_rows/apply_heads activations")
    ap.add_argument("--ckpts", type=int, default=38, help="checkpoints of the lora_dynamics run and the bank")
    ap.add_argument("--cut-layers", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--measure", nargs=3, metavar=("PATH", "MODE", "SHAPE"), help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.measure:
        print(json.dumps(measure(*a.measure, a)))
        return
    print(f"device: cpu ({torch.__version__}); rank {RANK}; activations {a.batch} x {a.seq}; {a.ckpts} checkpoints")
    rows = []
    for shape in a.shapes:
        n_layers = SHAPES[shape][2]
        r = {"shape": shape}
        for path in ("apply_rows", "apply_heads"):
            r[path] = tuple(run_one(path, m, shape, a) for m in ("old", "new"))
        dyn = {m: [run_one("lora_dynamics", m, shape, a, k) for k in (1, 2)] for m in ("old", "new")}
        # a negative slope (measurement noise of a flat peak) counts as 0
        r["lora_dynamics"] = tuple(p1 + max(0.0, p2 - p1) * (n_layers - 1) for p1, p2 in (dyn["old"], dyn["new"]))
        r["lora_dynamics_measured"] = dyn
        per = bank_gb(shape, 1)
        group = max(1, min(a.ckpts, int(4.0 // per))) if per > 0 else a.ckpts
        r["bank_gb"] = (bank_gb(shape, a.ckpts), bank_gb(shape, group), group)
        r["model_gb"] = model_gb(shape)
        rows.append(r)
        print(json.dumps(r), flush=True)
    print("\n| shape | path | old peak | new peak |\n|---|---|---:|---:|")
    for r in rows:
        for path in ("apply_rows", "apply_heads"):
            o, n = r[path]
            print(f"| {r['shape']} | `{path}` (one call, measured) | {o:.0f} MB | {n:.0f} MB |")
        o, n = r["lora_dynamics"]
        print(f"| {r['shape']} | `lora_dynamics` (extrapolated to {SHAPES[r['shape']][2]} layers) | "
              f"{o / 1024:.2f} GB | {n / 1024:.2f} GB |")  # fmt: skip
        b_all, b_group, group = r["bank_gb"]
        print(f"| {r['shape']} | LoRA bank of one job (computed) | {b_all:.1f} GB ({a.ckpts} ckpts) | "
              f"{b_group:.2f} GB ({group} ckpts, --bank-gb 4) |")  # fmt: skip
        print(f"| {r['shape']} | models alive in trajectory.py (computed, bf16) | {2 * r['model_gb']:.1f} GB (2) | "
              f"{r['model_gb']:.1f} GB (1) |")  # fmt: skip


if __name__ == "__main__":
    main()
