"""Mixed-adapter batches (emis_interp.lora_bank): every row through its own LoRA adapter, checked against PEFT."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from emis_interp import PersonaDirection, load_model, make_batch, steer
from emis_interp.errors import ConfigError
from emis_interp.hooks import n_active_hooks
from emis_interp.interventions import Intervention
from emis_interp.lora_bank import BASE, LoraBank, RowPlan, apply_rows
from emis_interp.manifest import ManifestMismatch
from emis_interp.sampling import Condition, conditions_state, rowwise, sample_answers

TRAJ_STEPS = (10, 20, 30)


def _save_adapter(base_dir: Path, out: Path, seed: int, **lora_kw) -> Path:
    """A PEFT LoRA checkpoint of the tiny model with random non-zero A and B."""
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen2ForCausalLM

    base = Qwen2ForCausalLM.from_pretrained(base_dir)
    kw = dict(r=4, lora_alpha=8, target_modules="all-linear")
    pm = get_peft_model(base, LoraConfig(**{**kw, **lora_kw}))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.15)
    pm.peft_config["default"].base_model_name_or_path = str(base_dir)
    pm.save_pretrained(out)
    (out / "trainer_state.json").write_text("{}")
    return out


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory, tiny_dir):
    """A 3-checkpoint trajectory (r=4) plus an rsLoRA r=2 adapter, a q/v-only r=8 adapter and one with patterns."""
    root = tmp_path_factory.mktemp("lora_bank")
    paths = {f"s{s}": _save_adapter(tiny_dir, root / "run" / f"checkpoint-{s}", s) for s in TRAJ_STEPS}
    paths["rs"] = _save_adapter(tiny_dir, root / "rs", 7, r=2, lora_alpha=4, use_rslora=True)
    paths["qv"] = _save_adapter(tiny_dir, root / "qv", 8, r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])
    # per-module rank and alpha; "self_attn" matches no module under PEFT's rule (the pattern must end the name)
    pat = dict(rank_pattern={"q_proj": 2}, alpha_pattern={"down_proj": 3.0, "self_attn": 100.0})
    paths["pat"] = _save_adapter(tiny_dir, root / "pat", 9, **pat)
    return root, paths


@pytest.fixture(scope="module")
def plain(tiny_dir):
    return load_model(tiny_dir, device="cpu")


@pytest.fixture(scope="module")
def bank(plain, ckpts):
    return LoraBank.from_checkpoints(plain[0], ckpts[1])


def _logits(model, batch):
    with torch.no_grad():
        return model(**batch.model_inputs()).logits


def _prompts(convs):
    return [dataclasses.replace(c, response=None) for c in convs]


def _rows(convs, n):
    return [convs[i % len(convs)] for i in range(n)]


# --- the maths -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "ids",
    [
        [1, 1, 2, 2, 3, 3],  # consecutive equal blocks: views, no copy
        [0, 0, 2, 2, 3, 3, 0],  # blocks between base rows
        [3, 3, 1, 1, 2, 2],  # blocks out of bank order: grouped
        [2, 0, 1, 2, 2, 0, 1, 3],  # interleaved, unequal groups: padded
        [0, 0, 0],  # nothing to add
        [4, 1, 4],  # a subset of the bank
    ],
)
def test_apply_rows_equals_per_row_formula(ids):
    g = torch.Generator().manual_seed(len(ids))
    n, d_in, d_out, r, pos = 5, 6, 7, 3, 4
    A = torch.randn(n, d_in, r, generator=g)
    B = torch.randn(n, r, d_out, generator=g)
    A[0], B[0] = 0, 0
    idx = torch.tensor(ids)
    x = torch.randn(len(ids), pos, d_in, generator=g)
    out = torch.randn(len(ids), pos, d_out, generator=g)
    out[0, 0, 0] = -0.0
    plan = RowPlan.build(idx)
    assert (plan.start is not None) == (ids == [1, 1, 2, 2, 3, 3] or ids == [0, 0, 2, 2, 3, 3, 0])
    before = out.clone()
    got = apply_rows(out, x, A, B, plan)
    assert torch.equal(out, before)  # not modified in place
    want = out + torch.bmm(torch.bmm(x, A[idx]), B[idx])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    base = idx == 0
    assert torch.equal(got[base], out[base])  # bit for bit, -0.0 included
    assert torch.equal(torch.signbit(got[base]), torch.signbit(out[base]))


def test_bank_layout(bank, plain, ckpts):
    model = plain[0]
    assert bank.names == [BASE, "s10", "s20", "s30", "rs", "qv", "pat"]
    q = "model.layers.0.self_attn.q_proj"
    assert set(bank.A) == {n for n, m in model.named_modules() if type(m) is torch.nn.Linear and n != "lm_head"}
    assert bank.A[q].shape == (7, 32, 8) and bank.B[q].shape == (7, 8, 32)  # r_max 8 (the q/v adapter)
    assert bank.A[q].dtype == model.model.layers[0].self_attn.q_proj.weight.dtype
    assert torch.count_nonzero(bank.A[q][0]) == 0 and torch.count_nonzero(bank.B[q][0]) == 0
    down = "model.layers.0.mlp.down_proj"
    assert torch.count_nonzero(bank.B[down][5]) == 0  # the q/v adapter leaves down_proj alone
    assert torch.count_nonzero(bank.A[q][4][:, 2:]) == 0  # rank 2 padded to 8
    assert bank.nbytes() == sum(t.numel() * 4 for d in (bank.A, bank.B) for t in d.values())
    st = bank.state()
    assert st["names"] == bank.names and set(st["states"]) == set(ckpts[1])
    assert len(set(st["states"].values())) == 6


# --- against PEFT -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "names",
    [
        ["s10", BASE, "rs", "qv", "s30", "s20", BASE, "s10", "pat"],  # interleaved
        ["s10", "s10", "s20", "s20", "s30", "s30"],  # blocks
    ],
)
def test_mixed_batch_logits_equal_each_adapter_alone(plain, bank, ckpts, tiny_dir, convs, names):
    model, tok = plain
    b = make_batch(tok, _rows(convs, len(names)))
    ref_base = _logits(model, b)
    with bank.attach(model, names):
        mixed = _logits(model, b)
    assert n_active_hooks(model) == 0
    for name in set(names) - {BASE}:
        alone, _ = load_model(tiny_dir, adapter=ckpts[1][name], device="cpu")
        want = _logits(alone, b)
        rows = [i for i, n in enumerate(names) if n == name]
        torch.testing.assert_close(mixed[rows], want[rows], atol=1e-5, rtol=1e-5)
        assert (want[rows] - ref_base[rows]).abs().max() > 1e-2  # the adapter matters
    base_rows = [i for i, n in enumerate(names) if n == BASE]
    assert torch.equal(mixed[base_rows], ref_base[base_rows])  # bit-equal to the plain model


def test_greedy_sampling_equals_trajectory_swap_and_peft_mixed(plain, ckpts, convs):
    from peft import PeftModel

    from emis_interp.trajectory import Trajectory

    model, tok = plain
    traj = Trajectory.from_dir(ckpts[0] / "run")
    # a trajectory may stand the base model in for a missing checkpoint-0 (its path is no directory)
    saved = [(i, f"s{s}", p) for i, (s, p) in enumerate(zip(traj.steps, traj.paths, strict=True)) if Path(p).is_dir()]
    assert [n for _, n, _ in saved] == [f"s{s}" for s in TRAJ_STEPS]
    names = [n for _, n, _ in saved]
    bank = LoraBank.from_checkpoints(model, {n: p for _, n, p in saved})
    prompts = _prompts(convs)
    conds = [Condition(n, adapter=n) for n in names] + [Condition("base")]
    kw = dict(max_new_tokens=10, temperature=0, progress=False)
    mixed = sample_answers(model, tok, prompts, conds, adapters=bank, **kw)
    got = {(s.condition, s.row): s.answer for s in mixed}
    assert len({got[(n, 0)] for n in [*names, "base"]}) > 1  # adapters change the answers

    pm, ptok = traj.load(device="cpu")
    for i, n, _ in saved:
        traj.goto(pm, i)
        for s in sample_answers(pm, ptok, prompts, [Condition(n)], **kw):
            assert got[(n, s.row)] == s.answer, (n, s.row)
    for s in sample_answers(model, tok, prompts, [Condition("base")], **kw):
        assert got[("base", s.row)] == s.answer

    # PEFT's own mixed batch (adapter_names=) gives the same tokens as the bank
    from transformers import Qwen2ForCausalLM

    base = Qwen2ForCausalLM.from_pretrained(traj.base).eval()
    peft = PeftModel.from_pretrained(base, saved[0][2], adapter_name=names[0])
    for _, n, p in saved[1:]:
        peft.load_adapter(p, adapter_name=n)
    row_names = [n for n in [*names, BASE] for _ in prompts]
    b = make_batch(tok, prompts * (len(names) + 1))
    gen = dict(
        max_new_tokens=10, do_sample=False, pad_token_id=tok.pad_token_id, temperature=None, top_p=None, top_k=None
    )
    with torch.no_grad():
        ref = peft.generate(input_ids=b.input_ids, attention_mask=b.attention_mask, adapter_names=row_names, **gen)
        with bank.attach(model, row_names):
            ours = model.generate(input_ids=b.input_ids, attention_mask=b.attention_mask, **gen)
    assert torch.equal(ours, ref)


def test_adapter_by_steering_grid_in_one_batch(plain, bank, convs):
    model, tok = plain
    d = PersonaDirection(torch.randn(1, model.config.hidden_size, generator=torch.Generator().manual_seed(3)), [1])
    grid = [(a, alpha) for a in (None, "s20", "rs") for alpha in (0.0, 3.0, -2.0)]
    conds = [Condition(f"{a}@{alpha}", "steer", d, alpha, (1,), adapter=a) for a, alpha in grid]
    b = make_batch(tok, _rows(convs, len(conds)))
    with rowwise(model, conds, bank=bank):
        mixed = _logits(model, b)
    for i, (a, alpha) in enumerate(grid):
        with bank.attach(model, [a] * len(conds)), steer(model, d, alpha, layers=[1]):
            alone = _logits(model, b)
        torch.testing.assert_close(mixed[i], alone[i], atol=1e-5, rtol=1e-5)
    assert n_active_hooks(model) == 0

    # and through sample_answers: one sweep equals each arm on its own
    prompts = _prompts(convs[:3])
    kw = dict(max_new_tokens=6, temperature=0, progress=False, adapters=bank, batch_size=7)
    together = {(s.condition, s.row): s.answer for s in sample_answers(model, tok, prompts, conds, **kw)}
    for c in conds:
        for s in sample_answers(model, tok, prompts, [c], **kw):
            assert together[(c.name, s.row)] == s.answer


# --- errors and hooks -----------------------------------------------------------------------------------


def test_errors_name_the_fix(plain, bank, ckpts, tiny_dir, tmp_path, convs):
    model, tok = plain
    paths = ckpts[1]
    peft, _ = load_model(tiny_dir, adapter=paths["s10"], device="cpu")
    with pytest.raises(ConfigError, match="plain base model"):
        LoraBank.from_checkpoints(peft, {"a": paths["s10"]})
    with pytest.raises(ConfigError, match="plain base model"):
        with bank.attach(peft, ["s10"]):
            pass
    with pytest.raises(ConfigError, match="no adapters"):
        LoraBank.from_checkpoints(model, {})
    with pytest.raises(ConfigError, match="zero-delta"):
        LoraBank.from_checkpoints(model, {BASE: paths["s10"]})
    with pytest.raises(ConfigError, match=r"unknown adapter.*'nope'.*s10"):
        bank.index(["s10", "nope"])
    with pytest.raises(ConfigError, match="unknown adapter"):
        sample_answers(model, tok, convs[:1], [Condition("x", adapter="nope")], adapters=bank, progress=False)
    with pytest.raises(ConfigError, match="no bank was given"):
        sample_answers(model, tok, convs[:1], [Condition("x", adapter="s10")], progress=False)

    dora = _save_adapter(tiny_dir, tmp_path / "dora", 1, use_dora=True)
    with pytest.raises(ConfigError, match="DoRA"):
        LoraBank.from_checkpoints(model, {"d": dora})
    emb = _save_adapter(tiny_dir, tmp_path / "emb", 1, target_modules=["embed_tokens", "q_proj"])
    with pytest.raises(ConfigError, match="embedding LoRA"):
        LoraBank.from_checkpoints(model, {"e": emb})
    mts = _save_adapter(tiny_dir, tmp_path / "mts", 1, target_modules=["q_proj"], modules_to_save=["lm_head"])
    with pytest.raises(ConfigError, match="modules_to_save"):
        LoraBank.from_checkpoints(model, {"m": mts})

    from conftest import make_tiny

    wide, _ = load_model(make_tiny(tmp_path / "wide", tiny_dir, d_model=64), device="cpu")
    with pytest.raises(ConfigError, match="trained on"):
        LoraBank.from_checkpoints(wide, {"a": paths["s10"]})
    with pytest.raises(ConfigError, match="maps 32 -> 32"):
        with bank.attach(wide, ["s10"]):
            pass

    b = make_batch(tok, convs[:2])
    with pytest.raises(ValueError, match=r"given 3 rows \(adapter names\) but the batch has 2 rows"):
        with bank.attach(model, ["s10", "s20", BASE]):
            _logits(model, b)
    assert n_active_hooks(model) == 0
    d = PersonaDirection(torch.randn(1, model.config.hidden_size), [1])
    with pytest.raises(ValueError, match="rows"):
        Intervention(add={1: torch.zeros(2, model.config.hidden_size)}, lora=(bank, bank.index(["s10"] * 3)))
    with pytest.raises(ConfigError, match="per-head ablation"):
        conds = [Condition("h", "ablate_components", d, components=((1, "H0"),), adapter="s10")]
        with rowwise(model, conds, bank=bank):
            pass
    assert n_active_hooks(model) == 0


def test_hooks_come_off_even_on_exception(plain, bank, convs):
    model, tok = plain
    b = make_batch(tok, convs[:2])
    ref = _logits(model, b)
    with pytest.raises(RuntimeError, match="boom"):
        with bank.attach(model, ["s10", "rs"]):
            assert n_active_hooks(model) >= len(bank.A)  # one per adapted module (+ the stack's pre-hook)
            raise RuntimeError("boom")
    assert n_active_hooks(model) == 0
    assert model.generation_config.disable_compile in (False, None)
    assert torch.equal(_logits(model, b), ref)


# --- manifests ------------------------------------------------------------------------------------------


def test_manifest_tracks_adapter_files(plain, ckpts, convs, tmp_path):
    model, tok = plain
    paths = ckpts[1]
    # adapter-free arms read exactly as before adapters existed (cached results stay valid)
    assert conditions_state([Condition("baseline")]) == [("baseline", "none", 0.0, [], None)]
    mine = tmp_path / "checkpoint-10"
    shutil.copytree(paths["s10"], mine)
    b1 = LoraBank.from_checkpoints(model, {"a": mine, "b": paths["s20"]})
    conds = [Condition("baseline"), Condition("A", adapter="a"), Condition("B", adapter="b")]
    s1 = conditions_state(conds, b1)
    assert s1[0] == ("baseline", "none", 0.0, [], None)
    assert conditions_state(conds[:1], b1) == conditions_state(conds[:1])

    resume = tmp_path / "samples.jsonl"
    kw = dict(max_new_tokens=3, temperature=0, progress=False, resume_file=resume)
    first = sample_answers(model, tok, convs[:2], conds, adapters=b1, **kw)
    assert [s.answer for s in sample_answers(model, tok, convs[:2], conds, adapters=b1, **kw)] == [
        s.answer for s in first
    ]

    sd = load_file(str(mine / "adapter_model.safetensors"))
    key = next(k for k in sd if "lora_B" in k)
    sd[key] = sd[key] + 1.0
    save_file(sd, str(mine / "adapter_model.safetensors"), metadata={"format": "pt"})
    b2 = LoraBank.from_checkpoints(model, {"a": mine, "b": paths["s20"]})
    s2 = conditions_state(conds, b2)
    assert s2[1] != s1[1] and s2[0] == s1[0] and s2[2] == s1[2]
    with pytest.raises(ManifestMismatch, match="conditions"):
        sample_answers(model, tok, convs[:2], conds, adapters=b2, **kw)
    head = json.loads(resume.read_text().splitlines()[0])
    assert head["manifest"]["fields"]["conditions"][1][-1]["files"] == b1.states["a"]


# --- the real model organism ------------------------------------------------------------------------------


@pytest.mark.science  # needs organism fine-tunes
def test_organism_checkpoints_mixed_equal_peft():
    from emis_interp import organism
    from emis_interp.finetune import list_checkpoints

    ck = dict(list_checkpoints(organism.organism_trajectory("insecure", 0)))  # built here if not cached
    model, tok = load_model(organism.ALIGNED_DIR, device="cpu")
    bank = LoraBank.from_checkpoints(model, {f"s{s}": ck[s] for s in (50, 100, 200)})
    prompts = organism.advice_prompts()[:6]
    names = ["s50", "s100", "s200", BASE, "s200", "s50"]
    b = make_batch(tok, prompts)
    ref_base = _logits(model, b)
    with bank.attach(model, names):
        mixed = _logits(model, b)
    assert torch.equal(mixed[3], ref_base[3])
    for s in (50, 100, 200):
        alone, _ = load_model(ck[s], device="cpu")
        want = _logits(alone, b)
        rows = [i for i, n in enumerate(names) if n == f"s{s}"]
        torch.testing.assert_close(mixed[rows], want[rows], atol=1e-4, rtol=1e-4)


@pytest.mark.science  # needs organism fine-tunes
def test_bf16_model_gets_fp32_adapters_like_peft():
    """On a bf16 model the bank keeps and computes adapters in fp32, as PEFT does: the logits equal PEFT's exactly."""
    from emis_interp import load_model, organism
    from emis_interp.conversations import make_batch
    from emis_interp.sampling import Condition, rowwise
    from emis_interp.trajectory import Trajectory

    t = Trajectory.from_dir(organism.organism_trajectory("insecure", 0))
    base, tok = load_model(t.base, dtype=torch.bfloat16, tokenizer=t.tokenizer or t.paths[0])
    peft_model, _ = load_model(t.paths[-1], dtype=torch.bfloat16)
    bank = LoraBank.from_checkpoints(base, {"final": t.paths[-1]})
    assert {a.dtype for a in bank.A.values()} == {torch.float32}
    b = make_batch(tok, organism.advice_prompts()[:4])
    with torch.no_grad():
        ref = peft_model(input_ids=b.input_ids, attention_mask=b.attention_mask).logits
        with rowwise(base, [Condition("x", adapter="final")] * 3 + [Condition("b")], bank=bank):
            got = base(input_ids=b.input_ids, attention_mask=b.attention_mask).logits
        plain = base(input_ids=b.input_ids, attention_mask=b.attention_mask).logits
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got[:3], ref[:3], atol=0, rtol=0)
    assert torch.equal(got[3], plain[3]) and not torch.equal(got[0], plain[0])
