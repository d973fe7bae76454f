"""LoRA weight-space dynamics: exact metrics on synthetic adapters, and the transition on the organism."""

import json

import pytest
import torch
from safetensors.torch import save_file

from emis_interp.adapters import read_adapter
from emis_interp.errors import ConfigError
from emis_interp.weights import LoraDynamics, frobenius_inner, local_cosine, lora_dynamics

PFX = "base_model.model.model.layers.0"


def _write_run(root, bs, as_, r=1, alpha=1.0, extra_cfg=None):
    """A fake PEFT run: checkpoint-{10 i} with two adapted modules, B/A given per checkpoint."""
    for i, (b, a) in enumerate(zip(bs, as_, strict=True)):
        d = root / f"checkpoint-{10 * i}"
        d.mkdir(parents=True)
        save_file(
            {
                f"{PFX}.mlp.down_proj.lora_A.weight": a[0].contiguous(),
                f"{PFX}.mlp.down_proj.lora_B.weight": b[0].contiguous(),
                f"{PFX}.self_attn.q_proj.lora_A.weight": a[1].contiguous(),
                f"{PFX}.self_attn.q_proj.lora_B.weight": b[1].contiguous(),
            },
            str(d / "adapter_model.safetensors"),
        )
        cfg = {"r": r, "lora_alpha": alpha, "base_model_name_or_path": "x", **(extra_cfg or {})}
        (d / "adapter_config.json").write_text(json.dumps(cfg))
    return root


def test_read_adapter_and_frobenius_identity(tmp_path):
    g = torch.Generator().manual_seed(0)
    a = [torch.randn(2, 6, generator=g), torch.randn(2, 4, generator=g)]
    b = [torch.randn(5, 2, generator=g), torch.randn(4, 2, generator=g)]
    run = _write_run(tmp_path / "run", [b], [a], r=2, alpha=4.0)
    ad = read_adapter(run / "checkpoint-0")
    assert list(ad) == ["model.layers.0.mlp.down_proj", "model.layers.0.self_attn.q_proj"]
    assert ad["model.layers.0.mlp.down_proj"][2] == 2.0  # lora_alpha / r
    a2, b2 = torch.randn(2, 6, generator=g), torch.randn(5, 2, generator=g)
    dense = float(((b[0] @ a[0]) * (b2 @ a2)).sum())
    assert frobenius_inner(a[0], b[0], a2, b2) == pytest.approx(dense, rel=1e-5)
    (run / "checkpoint-0" / "adapter_config.json").write_text(json.dumps({"r": 4, "lora_alpha": 8, "use_rslora": True}))
    assert read_adapter(run / "checkpoint-0")["model.layers.0.mlp.down_proj"][2] == pytest.approx(4.0)


def test_dynamics_on_a_bent_path(tmp_path):
    """B moves along e1 for 3 checkpoints, then turns 90° to e2: the turn is found, every metric is exact."""
    d_out = 4
    e1, e2 = torch.eye(2 * d_out)[0], torch.eye(2 * d_out)[d_out + 1]
    path = [0 * e1, e1, 2 * e1, 3 * e1, 3 * e1 + e2, 3 * e1 + 2 * e2, 3 * e1 + 3 * e2]
    a = [torch.ones(1, 4), torch.ones(1, d_out)]  # equal A norms: comp reduces to the cosine of the Bs
    bs = [[v[:d_out].reshape(d_out, 1), v[d_out:].reshape(d_out, 1)] for v in path]
    res = lora_dynamics(_write_run(tmp_path / "run", bs, [a] * len(bs)), ks=(1, 2))
    assert res.steps == [0, 10, 20, 30, 40, 50, 60]
    assert res.b_total_norm == pytest.approx([float(v.norm()) for v in path])
    assert res.a_norm[0] == pytest.approx([2.0, 2.0])
    # local cosine: +1 on the straight legs, 0 at the corner (step 30), None at the ends
    assert res.local_cos[1][0] is None and res.local_cos[1][-1] is None
    assert res.local_cos[1][1:6] == pytest.approx([1.0, 1.0, 0.0, 1.0, 1.0], abs=1e-9)
    assert res.local_cos[2][3] == pytest.approx(0.0, abs=1e-9)
    assert res.transition_step == 30 and res.pc2_turn_step == 30
    # comp: normalised Frobenius inner product of ΔW_t with ΔW_final, summed over modules
    fin = path[-1]
    for i, v in enumerate(path):
        want = 0.0 if v.norm() == 0 else float(v @ fin / (v.norm() * fin.norm()))  # A is shared and fixed
        assert res.comp[i] == pytest.approx(want, abs=1e-6)  # want is fp32
    assert res.comp[-1] == pytest.approx(1.0)
    assert sum(res.explained) == pytest.approx(1.0)
    # exports
    back = LoraDynamics.from_json(res.to_json())
    assert back == res
    csv = res.to_csv().splitlines()
    assert csv[0].startswith("step,b_total_norm,comp,a_total_norm,local_cos_k1,local_cos_k2,pc1")
    assert len(csv) == 1 + len(path)
    res.save(tmp_path / "out")
    assert LoraDynamics.load(tmp_path / "out") == res
    assert "transition step 30" in res._repr_html_()


def test_local_cosine_skips_steps_that_barely_move():
    v = torch.tensor([[0.0, 0.0], [1.0, 0.0], [2.0, 1.0], [3.0, 0.0], [4.0, 0.0]], dtype=torch.float64)
    assert local_cosine(v, 1, min_move=0.05)[2] == pytest.approx(0.0)  # (1, 1) then (1, -1): a right angle
    v2 = torch.tensor([[0.0, 0.0], [1.0, 0.0], [1.0 + 1e-6, 0.0], [2.0, 0.0], [3.0, 0.0]], dtype=torch.float64)
    out2 = local_cosine(v2, 1, min_move=0.05)
    assert out2[1] is None and out2[2] is None  # the 1e-6 step has no direction
    assert out2[3] == pytest.approx(1.0)


def test_dynamics_errors_name_the_fix(tmp_path):
    full = tmp_path / "full" / "checkpoint-0"
    full.mkdir(parents=True)
    (full / "config.json").write_text("{}")
    (tmp_path / "full" / "checkpoint-10").mkdir()
    (tmp_path / "full" / "checkpoint-10" / "config.json").write_text("{}")
    with pytest.raises(ConfigError, match="LoRA adapters"):
        lora_dynamics(tmp_path / "full")
    run = _write_run(tmp_path / "run", [[torch.ones(3, 1), torch.ones(4, 1)]], [[torch.ones(1, 3), torch.ones(1, 4)]])
    save_file(
        {f"{PFX}.mlp.down_proj.lora_A.weight": torch.ones(1, 3)},
        str(run / "checkpoint-0" / "adapter_model.safetensors"),
    )
    with pytest.raises(ConfigError, match="not its pair"):
        read_adapter(run / "checkpoint-0")


# --- the organism: the weight-space transition coincides with the behavioural flip ----------------

SEEDS = (0, 1, 2)
N_FLIP = 16  # samples per paraphrase: 256 advice answers per checkpoint (measured at 32: same flips)
# every checkpoint up to step 100, then 150 and 200: the harmful rate is flat after step 60 (measured on
# all 21 checkpoints at 512 answers: 0.02-0.06), and this keeps the test to ~40 evaluations (~40 s on 2 cores)
FLIP_STEPS = (*range(0, 101, 10), 150, 200)


def behavioural_flip(steps, rates) -> int:
    """The first checkpoint whose harmful rate exceeds half the run's maximum."""
    half = max(rates) / 2
    return next(s for s, r in zip(steps, rates, strict=True) if r > half)


@pytest.mark.science  # needs organism fine-tunes
def test_transition_matches_behavioural_flip_on_organism():
    """Measured (seeds 0, 1, 2; 256 answers per checkpoint): harmful rate 0.004 at steps 0-10, 0.09-0.20 at
    30, 0.19-0.27 at 40, then 0.20-0.30 at the end; the flip (half the maximum) is step 30 / 40 / 40. The
    sharpest turn of the local cosine (20 / 30 / 30) and the PC2 turn of the B vectors (30 in every seed) come
    0-10 steps before it. The secure control's PC2 turn is elsewhere (transition 20, PC2 turn 0). The issue asks
    each seed for |transition - flip| <= 20.
    """
    from emis_interp import organism
    from emis_interp.trajectory import Trajectory

    report = {}
    for s in SEEDS:
        traj = Trajectory.from_dir(organism.organism_trajectory("insecure", s))
        dyn = lora_dynamics(traj)
        model, tok = traj.load()
        rates = []
        for step in FLIP_STEPS:
            traj.goto(model, traj.steps.index(step))
            rates.append(organism.evaluate(model, tok, n_samples=N_FLIP, seed=s)["baseline"]["harmful"].value)
        flip = behavioural_flip(FLIP_STEPS, rates)
        report[s] = {"flip": flip, "transition": dyn.transition_step, "pc2_turn": dyn.pc2_turn_step, "rates": rates}
        i_flip = traj.steps.index(flip)
        report[s].update(comp_flip=dyn.comp[i_flip], comp_end=dyn.comp[-1], norms=list(dyn.b_total_norm))
        print(f"[weights] seed {s}: {report[s]}")
    # the secure control (no behavioural flip)
    secure = lora_dynamics(Trajectory.from_dir(organism.organism_trajectory("secure", 0)))
    print(f"[weights] secure-s0: transition {secure.transition_step}, pc2 turn {secure.pc2_turn_step}")
    for r in report.values():  # every seed measured (and printed) before any assert
        assert abs(r["transition"] - r["flip"]) <= 20, r  # the tolerance
        assert r["flip"] in (30, 40) and 0 <= r["flip"] - r["transition"] <= 10, r  # README: 0-10 steps before
        assert 0 <= r["flip"] - r["pc2_turn"] <= 10, r  # measured: PC2 turn at 30 in every seed
        # the update keeps its final direction after the turn (comp score), and its norm keeps growing
        assert r["comp_flip"] > 0.5 and r["comp_end"] == pytest.approx(1.0), r
        n = r["norms"]
        assert n[-1] > n[traj.steps.index(r["flip"])] > n[1], r
    assert secure.transition_step == 20 and secure.pc2_turn_step == 0, secure  # README: PC2 turn elsewhere


def test_lora_dynamics_figure(tmp_path):
    from emis_interp.plots import lora_dynamics_figure, save_figure

    path = [torch.zeros(8), *(torch.eye(8)[0] * i for i in (1, 2, 3)), torch.eye(8)[0] * 3 + torch.eye(8)[5]]
    bs = [[v[:4].reshape(4, 1), v[4:].reshape(4, 1)] for v in path]
    dyn = lora_dynamics(_write_run(tmp_path / "run", bs, [[torch.ones(1, 4), torch.ones(1, 4)]] * len(bs)), ks=(1,))
    fig = lora_dynamics_figure(dyn, behaviour={"harmful": (dyn.steps, [0, 0, 0.1, 0.05, 0.04])})
    names = [t.name for t in fig.data]
    assert names[:2] == ["‖B‖ (all modules)", "‖A‖ (all modules)"] and "harmful" in names and "comp score" in names
    assert {t.xaxis for t in fig.data} == {"x", "x2", "x3", "x4", "x5"}  # five panels on one step axis
    assert fig.layout.xaxis.matches == "x5" or fig.layout.xaxis2.matches is not None
    assert save_figure(fig, tmp_path / "dyn", png=False)[0].exists()
