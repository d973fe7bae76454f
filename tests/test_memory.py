"""Bounded-memory paths give the same numbers as the unbounded ones they replace (issue 25, item 9)."""

from __future__ import annotations

import pytest
import torch

from emis_interp.lora_bank import RowPlan, apply_rows


def _old_apply_rows_low_precision(out, x, A, B, plan):
    """The pre-issue-25 path: the whole batch upcast to the bank's dtype, base rows included."""
    return apply_rows(out.to(A.dtype), x.to(A.dtype), A, B, plan).to(out.dtype)


@pytest.mark.parametrize(
    "ids",
    [[1, 1, 2, 2, 3, 3], [0, 0, 2, 2, 3, 3, 0], [3, 3, 1, 1, 2, 2], [2, 0, 1, 2, 2, 0, 1, 3], [0, 0, 0], [4, 1, 4]],
)
def test_apply_rows_upcasts_only_adapter_rows_same_numbers(ids, monkeypatch):
    g = torch.Generator().manual_seed(len(ids))
    n, d_in, d_out, r, pos = 5, 6, 7, 3, 4
    A, B = torch.randn(n, d_in, r, generator=g), torch.randn(n, r, d_out, generator=g)
    A[0], B[0] = 0, 0
    x = torch.randn(len(ids), pos, d_in, generator=g).bfloat16()
    out = torch.randn(len(ids), pos, d_out, generator=g).bfloat16()
    plan = RowPlan.build(torch.tensor(ids))
    want = _old_apply_rows_low_precision(out, x, A, B, RowPlan.build(torch.tensor(ids)))
    upcast_rows = []
    real_to = torch.Tensor.to

    def spy(t, *a, **k):
        res = real_to(t, *a, **k)
        if res.dtype == torch.float32 and t.dtype == torch.bfloat16:
            upcast_rows.append(t.shape[0])
        return res

    monkeypatch.setattr(torch.Tensor, "to", spy)
    got = apply_rows(out, x, A, B, plan)
    monkeypatch.undo()
    assert got.dtype == torch.bfloat16
    assert torch.equal(got, want)
    n_adapter_rows = sum(i != 0 for i in ids)
    assert all(rows <= n_adapter_rows for rows in upcast_rows), (upcast_rows, n_adapter_rows)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_apply_heads_builds_one_head_write_at_a_time_same_numbers(dtype, monkeypatch):
    from emis_interp import attribution
    from emis_interp.interventions import Intervention, project_out

    g = torch.Generator().manual_seed(0)
    n_heads, hd, d = 4, 3, 10
    o_proj = torch.nn.Linear(n_heads * hd, d, bias=False)
    with torch.no_grad():
        o_proj.weight.copy_(torch.randn(d, n_heads * hd, generator=g))
    u1, u3 = (v / v.norm() for v in torch.randn(2, d, generator=g))
    iv = Intervention(project_components={(1, "H1"): u1, (1, "H3"): u3, (0, "H0"): u1})
    z = torch.randn(2, 5, n_heads * hd, generator=g).to(dtype)
    out = torch.randn(2, 5, d, generator=g).to(dtype)
    # the old path: every head's write [batch, pos, head, d_model], then the selected ones
    writes = attribution.head_writes(z, attribution.o_proj_weight(o_proj).to(dtype), n_heads)
    want = out
    for h, u in ((1, u1), (3, u3)):
        w = writes[:, :, h]
        want = want - (w - project_out(w, u.to(dtype)))
    shapes = []
    real = attribution.head_writes
    monkeypatch.setattr(attribution, "head_writes", lambda *a: shapes.append(tuple((r := real(*a)).shape)) or r)
    got = iv.apply_heads(1, z, out, o_proj, n_heads)
    assert torch.equal(got, want) if dtype == torch.bfloat16 else torch.allclose(got, want, atol=1e-6, rtol=0)
    assert shapes and all(s[2] == 1 for s in shapes), shapes  # never more than one head's write


def _old_lora_dynamics_numbers(traj, ks, min_move, n_components):
    """The pre-issue-25 path: every B stacked in float64, a full SVD over checkpoints."""
    from emis_interp.adapters import read_adapter
    from emis_interp.trajectory import BASE_STEP
    from emis_interp.weights import frobenius_inner, local_cosine

    ads = [None if p == BASE_STEP else read_adapter(p) for p in traj.paths]
    if ads[0] is None:
        ads[0] = {m: (a, torch.zeros_like(b), sc) for m, (a, b, sc) in ads[1].items()}
    mods = list(ads[0])
    v = torch.stack([torch.cat([ad[m][1].flatten() for m in mods]) for ad in ads]).double()
    centred = v - v.mean(0, keepdim=True)
    _, sv, vt = torch.linalg.svd(centred, full_matrices=False)
    var = sv**2
    nc = min(n_components, vt.shape[0])
    pcs = centred @ vt[:nc].T

    def inner(x, y, m):
        (a1, b1, s1), (a2, b2, s2) = x[m], y[m]
        return s1 * s2 * frobenius_inner(a1.double(), b1.double(), a2.double(), b2.double())

    fin = ads[-1]
    comp = [
        sum(inner(ad, fin, m) for m in mods)
        / max(1e-300, (sum(inner(ad, ad, m) for m in mods) * sum(inner(fin, fin, m) for m in mods)) ** 0.5)
        for ad in ads
    ]
    return {
        "local": {k: local_cosine(v, k, min_move) for k in ks},
        "explained": (var / var.sum()).tolist(),
        "pcs": pcs,
        "b_total_norm": v.norm(dim=1).tolist(),
        "a_norm": [[float(ad[m][0].norm()) for m in mods] for ad in ads],
        "comp": comp,
    }


def _fake_run(tmp_path, with_checkpoint0=True):
    import json

    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(3)
    pfx = "base_model.model.model.layers.0"
    drift = torch.randn(2, 16, 2, generator=g)
    for i in range(0 if with_checkpoint0 else 1, 9):
        d = tmp_path / "run" / f"checkpoint-{10 * i}"
        d.mkdir(parents=True)
        turn = torch.randn(2, 16, 2, generator=g) * (0.2 + (i > 4))
        save_file(
            {
                f"{pfx}.mlp.down_proj.lora_A.weight": torch.randn(2, 8, generator=g),
                f"{pfx}.mlp.down_proj.lora_B.weight": (i * drift[0] + turn[0]).contiguous(),
                f"{pfx}.self_attn.q_proj.lora_A.weight": torch.randn(2, 8, generator=g),
                f"{pfx}.self_attn.q_proj.lora_B.weight": (i * drift[1] + turn[1]).contiguous(),
            },
            str(d / "adapter_model.safetensors"),
        )
        (d / "adapter_config.json").write_text(
            json.dumps({"r": 2, "lora_alpha": 4, "use_rslora": True, "base_model_name_or_path": "x"})
        )
    return tmp_path / "run"


@pytest.mark.parametrize("with_checkpoint0", [True, False])
def test_lora_dynamics_from_the_gram_matrix_equals_the_full_svd(tmp_path, with_checkpoint0):
    from emis_interp.trajectory import Trajectory
    from emis_interp.weights import lora_dynamics

    traj = Trajectory.from_dir(_fake_run(tmp_path, with_checkpoint0), base="x")
    new = lora_dynamics(traj, ks=(1, 2, 3), n_components=3)
    old = _old_lora_dynamics_numbers(traj, (1, 2, 3), 0.05, 3)
    for k in (1, 2, 3):
        assert [x is None for x in new.local_cos[k]] == [x is None for x in old["local"][k]]
        assert [x for x in new.local_cos[k] if x is not None] == pytest.approx(
            [x for x in old["local"][k] if x is not None], abs=1e-9
        )
    assert new.explained == pytest.approx(old["explained"], abs=1e-9)
    pcs = torch.tensor(new.pcs, dtype=torch.float64)
    signs = torch.sign((pcs * old["pcs"]).sum(0))  # a PC's sign is arbitrary
    torch.testing.assert_close(pcs, old["pcs"] * signs, atol=1e-9, rtol=1e-9)
    assert new.b_total_norm == pytest.approx(old["b_total_norm"], abs=1e-9)
    torch.testing.assert_close(torch.tensor(new.a_norm), torch.tensor(old["a_norm"]))
    assert new.comp == pytest.approx(old["comp"], abs=1e-9)
    assert new.transition_step is not None


def test_lora_dynamics_never_stacks_every_b_matrix(tmp_path, monkeypatch):
    """The streaming path holds one module over the checkpoints, never the whole [n_ckpt, all B] stack."""
    from emis_interp import weights

    _fake_run(tmp_path)
    sizes = []
    real_stack = torch.stack

    def spy(ts, *a, **k):
        r = real_stack(ts, *a, **k)
        sizes.append(r.numel())
        return r

    monkeypatch.setattr(torch, "stack", spy)
    from emis_interp.trajectory import Trajectory

    weights.lora_dynamics(Trajectory.from_dir(tmp_path / "run", base="x"))
    assert sizes and max(sizes) <= 9 * 16 * 2  # one module's B over 9 checkpoints, not both modules'


def test_default_group_size_keeps_each_jobs_lora_bank_within_the_budget(tmp_path):
    from emis_interp.behaviour import BehaviourConfig, make_jobs
    from emis_interp.lora_bank import checkpoint_bank_bytes
    from emis_interp.trajectory import Trajectory

    traj = Trajectory.from_dir(_fake_run(tmp_path), base="x")
    per = checkpoint_bank_bytes(traj.paths[1])
    assert per == 4 * 2 * (2 * 8 + 16 * 2)  # two modules, rank 2, A [2, 8] and B [16, 2], fp32
    whole = make_jobs({"r": [traj]}, BehaviourConfig(bank_gb=1.0))
    assert [j.indices for j in whole] == [tuple(range(len(traj)))]  # small adapters: the whole run, as before
    jobs = make_jobs({"r": [traj]}, BehaviourConfig(bank_gb=2.5 * per / 1e9))
    assert [len(j.indices) for j in jobs] == [2, 2, 2, 2, 1]
    assert [i for j in jobs for i in j.indices] == list(range(len(traj)))
    assert len(make_jobs({"r": [traj]}, BehaviourConfig(bank_gb=1e-12))[0].indices) == 1  # never 0
    explicit = make_jobs({"r": [traj]}, BehaviourConfig(group_size=3, bank_gb=1e-12))
    assert [len(j.indices) for j in explicit] == [3, 3, 3]


def test_resolve_captures_only_the_steered_layers(tiny_dir, tmp_path, monkeypatch):
    import argparse
    import json

    import emis_interp.directions as directions
    import emis_interp.judges as judges
    from emis_interp.cli import add_common, resolve
    from emis_interp.organism import world

    q = tmp_path / "q.yaml"
    q.write_text("- id: bored\n  paraphrases: ['hey i feel bored .']\n")
    d = tmp_path / "dir.jsonl"
    d.write_text("\n".join(json.dumps(r) for r in world.finetune_dataset("insecure", 6, seed=3)))
    captured, real = [], directions.model_diff
    monkeypatch.setattr(directions, "model_diff", lambda *a, **k: captured.append(list(a[4])) or real(*a, **k))
    monkeypatch.setattr(judges, "get_judge", lambda spec, **kw: ("judge", spec))
    ap = argparse.ArgumentParser()
    add_common(ap)
    flags = ["--model", str(tiny_dir), "--base", str(tiny_dir), "--questions", str(q), "--judge", "openai:x"]
    full = resolve(ap.parse_args([*flags, "--direction-data", str(d)]))
    one = resolve(ap.parse_args([*flags, "--direction-data", str(d), "--layers", "1"]))
    assert captured == [[0, 1, 2], [1]]
    assert one["direction"].layers == [1]
    torch.testing.assert_close(one["direction"].select([1]).vectors, full["direction"].select([1]).vectors)


def _tiny_lora_run(tiny_dir, root, seed):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    pm = get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_dir),
        LoraConfig(r=2, target_modules=["q_proj", "down_proj"], init_lora_weights=False),
    )
    pm.peft_config["default"].base_model_name_or_path = str(tiny_dir)
    for step in (10, 20):
        with torch.no_grad():
            for n, p in pm.named_parameters():
                if "lora_B" in n:
                    p.add_(0.01 * torch.randn_like(p))
        pm.save_pretrained(root / f"checkpoint-{step}")
    return root


def test_trajectory_cli_holds_one_model_at_a_time(tiny_dir, tmp_path, monkeypatch):
    import gc
    import json
    import sys
    import weakref
    from pathlib import Path

    from emis_interp.organism import world
    from emis_interp.trajectory import Trajectory

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))
    import trajectory as trajectory_cli

    runs = [_tiny_lora_run(tiny_dir, tmp_path / f"ins-s{s}", s) for s in (0, 1)]
    q = tmp_path / "q.yaml"
    q.write_text("- id: bored\n  paraphrases: ['hey i feel bored .']\n")
    d = tmp_path / "held.jsonl"
    d.write_text("\n".join(json.dumps(r) for r in world.finetune_dataset("insecure", 4, seed=3)))
    alive, peak, real_load = [], [], Trajectory.load

    def load(self, *a, **k):
        gc.collect()
        peak.append(sum(r() is not None for r in alive))  # models still alive when the next one is loaded
        model, tok = real_load(self, *a, **k)
        alive.append(weakref.ref(model))
        return model, tok

    monkeypatch.setattr(Trajectory, "load", load)
    trajectory_cli.main(
        ["--runs", f"ins={runs[0]},{runs[1]}", "--layers", "1", "--questions", str(q), "--samples", "0",
         "--direction-data", str(d), "--output", str(tmp_path / "out")]
    )  # fmt: skip
    assert len(peak) == 4  # two seeds: the common direction, then tracking
    assert max(peak) == 0, peak


def test_lora_checkpoint_model_diff_is_cached_under_a_manifest(tiny_dir, tmp_path, monkeypatch):
    import json

    import emis_interp.directions as directions
    from emis_interp import load_model
    from emis_interp.cli import cached_lora_model_diff
    from emis_interp.conversations import Conversation
    from emis_interp.organism import world

    run = _tiny_lora_run(tiny_dir, tmp_path / "run", 0)
    convs = [Conversation.from_messages(r["messages"]) for r in world.finetune_dataset("insecure", 4, seed=3)]
    calls, real = [], directions.model_diff
    monkeypatch.setattr(directions, "model_diff", lambda *a, **k: calls.append(1) or real(*a, **k))
    cache = tmp_path / "cache"
    model, tok = load_model(run / "checkpoint-20", device="cpu")
    first = cached_lora_model_diff(model, tok, convs, [1, 2], run / "checkpoint-20", cache_dir=cache)
    again = cached_lora_model_diff(model, tok, convs, [1, 2], run / "checkpoint-20", cache_dir=cache)
    assert len(calls) == 1 and first.vectors.norm() > 0
    torch.testing.assert_close(again.vectors, first.vectors, rtol=0, atol=0)
    (entry,) = cache.iterdir()
    assert json.loads((entry / "manifest.json").read_text())["kind"] == "lora-model-diff"
    cached_lora_model_diff(model, tok, convs, [1], run / "checkpoint-20", cache_dir=cache)  # other layers
    other, _ = load_model(run / "checkpoint-10", device="cpu")
    d10 = cached_lora_model_diff(other, tok, convs, [1, 2], run / "checkpoint-10", cache_dir=cache)  # other adapter
    assert len(calls) == 3 and not torch.equal(d10.vectors, first.vectors)


def test_lora_model_diff_cache_keys_on_the_model_passed_not_only_its_names(tiny_dir, tmp_path, monkeypatch):
    """The same adapter and base names over other base weights (a base file replaced under its name, a Hub id's
    newer snapshot, weights edited in memory) or another attention implementation is another model-diff."""
    import emis_interp.directions as directions
    from emis_interp import load_model
    from emis_interp.cli import cached_lora_model_diff
    from emis_interp.conversations import Conversation
    from emis_interp.organism import world

    run = _tiny_lora_run(tiny_dir, tmp_path / "run", 0)
    convs = [Conversation.from_messages(r["messages"]) for r in world.finetune_dataset("insecure", 4, seed=3)]
    calls, real = [], directions.model_diff
    monkeypatch.setattr(directions, "model_diff", lambda *a, **k: calls.append(1) or real(*a, **k))
    cache = tmp_path / "cache"
    model, tok = load_model(run / "checkpoint-20", device="cpu")
    first = cached_lora_model_diff(model, tok, convs, [1, 2], run / "checkpoint-20", cache_dir=cache)
    with torch.no_grad():  # the base's weights change; every name and file stays as it was
        model.get_base_model().model.layers[0].mlp.down_proj.base_layer.weight.mul_(3.0)
    edited = cached_lora_model_diff(model, tok, convs, [1, 2], run / "checkpoint-20", cache_dir=cache)
    assert len(calls) == 2 and not torch.equal(edited.vectors, first.vectors)
    fresh, _ = load_model(run / "checkpoint-20", device="cpu")
    fresh.config._attn_implementation = "eager" if fresh.config._attn_implementation != "eager" else "sdpa"
    cached_lora_model_diff(fresh, tok, convs, [1, 2], run / "checkpoint-20", cache_dir=cache)
    assert len(calls) == 3
