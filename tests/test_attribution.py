"""Component attribution: per-head writes, the decomposition, component ablation, and (organism) its causal test."""

import random

import pytest
import torch

from emis_interp import load_model, organism
from emis_interp.attribution import (
    attribution_trajectory,
    component_attribution,
    head_projections,
    head_writes,
    o_proj_weight,
)
from emis_interp.directions import PersonaDirection
from emis_interp.hooks import n_active_hooks, register, unregister
from emis_interp.interventions import ablate_components
from emis_interp.models import decoder_layers
from emis_interp.organism import world
from emis_interp.sampling import Condition, rowwise, sample_answers


def _random_direction(model, layers, seed=0):
    g = torch.Generator().manual_seed(seed)
    return PersonaDirection(torch.randn(len(layers), model.config.hidden_size, generator=g), list(layers))


def _o_proj_io(model, batch, layer):
    got = {}
    o = decoder_layers(model)[layer].self_attn.o_proj
    h = register(o, lambda m, args, out: got.update(z=args[0].detach(), out=out.detach()))
    try:
        with torch.no_grad():
            model(**batch.model_inputs())
    finally:
        unregister([h])
    return got, o


@pytest.fixture(scope="module")
def insecure():
    torch.set_num_threads(2)
    return load_model(organism.organism_trajectory("insecure", 0) / "checkpoint-200")


@pytest.mark.science  # needs organism fine-tunes
def test_heads_sum_to_o_proj_output(tiny, convs, insecure):
    from emis_interp import make_batch

    for model, tok in (tiny, insecure):  # a plain Qwen2 and a PEFT/LoRA one (effective weight)
        batch = make_batch(tok, convs)
        for layer in range(len(decoder_layers(model))):
            got, o = _o_proj_io(model, batch, layer)
            w = o_proj_weight(o)
            writes = head_writes(got["z"], w, model.config.num_attention_heads)
            assert writes.shape[2] == model.config.num_attention_heads
            torch.testing.assert_close(writes.sum(2), got["out"], atol=1e-5, rtol=1e-5)
            u = torch.nn.functional.normalize(torch.randn(model.config.hidden_size), dim=0)
            torch.testing.assert_close(
                head_projections(got["z"], w, u, model.config.num_attention_heads),
                writes @ u,
                atol=1e-5,
                rtol=1e-5,
            )
    # the LoRA delta is part of the effective o_proj weight (it is not zero after fine-tuning)
    o = decoder_layers(insecure[0])[3].self_attn.o_proj
    assert (o_proj_weight(o) - o.base_layer.weight).abs().max() > 1e-4


@pytest.mark.science  # needs organism fine-tunes
def test_attribution_decomposes_the_model_diff(insecure):
    """With one fixed direction, every component's change (fine-tuned minus aligned) summed over the
    layers up to l is the model-diff shift at layer l along its own unit vector: the decomposition is exact."""
    aligned, tok = load_model(organism.ALIGNED_DIR)
    model, _ = insecure
    d = organism.persona_direction(aligned, model, tok, cache_dir=None, progress=False)
    convs = organism.direction_conversations()
    for src in (0, 2, 3):
        a = component_attribution(model, tok, convs, d, source_layer=src)
        b = component_attribution(aligned, tok, convs, d, source_layer=src)
        diff = (a.mean() - b.mean())[: src + 1].sum()
        assert abs(float(diff) - d.vector(src).norm().item()) < 1e-3 * d.vector(src).norm().item() + 1e-4
    assert n_active_hooks(model) == 0
    a = component_attribution(model, tok, convs, d)
    assert a.values.shape == (len(convs), 4, 5) and a.components == ["H0", "H1", "H2", "H3", "MLP"]
    # LoRA deltas of residual writers are projected, every adapted module gets a norm
    assert set(a.lora_proj) == {f"L{i}.{m}" for i in range(4) for m in ("o_proj", "down_proj")}
    assert len(a.lora_norm) == 4 * 7 and all(float(v.mean()) > 0 for v in a.lora_norm.values())
    with pytest.raises(ValueError, match="source_layer"):
        component_attribution(model, tok, convs, d.select([2]))
    with pytest.raises(ValueError, match="response"):
        component_attribution(model, tok, organism.advice_prompts(), d)


def test_ablate_components_removes_exactly_those_writes(tiny, convs):
    from emis_interp import make_batch

    model, tok = tiny
    batch = make_batch(tok, convs)
    d = _random_direction(model, [0, 1, 2])
    u1 = d.unit(1)
    base, o = _o_proj_io(model, batch, 1)
    with ablate_components(model, d, [(1, "H1"), (2, "MLP")]):
        got, _ = _o_proj_io(model, batch, 1)
        mlp = {}
        h = register(decoder_layers(model)[2].mlp, lambda m, a, out: mlp.update(out=out.detach()))
        with torch.no_grad():
            model(**batch.model_inputs())
        unregister([h])
    assert n_active_hooks(model) == 0
    head1 = head_writes(base["z"], o_proj_weight(o), model.config.num_attention_heads)[:, :, 1]
    torch.testing.assert_close(got["out"], base["out"] - (head1 @ u1)[..., None] * u1, atol=1e-5, rtol=1e-5)
    assert (mlp["out"] @ d.unit(2)).abs().max() < 1e-5
    # per-row: a baseline row is untouched, bit for bit
    conds = [Condition("base"), Condition("abl", "ablate_components", d, components=((1, "H1"), (0, "MLP")))]
    b2 = make_batch(tok, convs[:1] * 2)
    with torch.no_grad():
        ref = model(**b2.model_inputs()).logits
        with rowwise(model, conds):
            out = model(**b2.model_inputs()).logits
    assert torch.equal(out[0], ref[0]) and not torch.allclose(out[1], ref[1])
    with pytest.raises(ValueError, match="H0"):
        rowwise_check(model, d)
    with pytest.raises(ValueError, match="ablate_components"):
        Condition("x", "ablate", d, components=((1, "H1"),))


def rowwise_check(model, d):
    with rowwise(model, [Condition("x", "ablate_components", d, components=((1, "head 1"),))]):
        pass


@pytest.mark.science  # needs organism fine-tunes
def test_attribution_trajectory_and_figures(insecure):
    from emis_interp import plots
    from emis_interp.trajectory import Trajectory

    aligned, tok = load_model(organism.ALIGNED_DIR)
    tr = Trajectory.from_dir(organism.organism_trajectory("insecure", 0))
    model, _ = tr.load()
    d = organism.persona_direction(aligned, insecure[0], tok, cache_dir=None, progress=False)
    convs = organism.direction_conversations(16)
    traj = attribution_trajectory(tr, model, tok, convs, d, indices=[0, 10, 20])
    assert traj.steps == [0, 100, 200] and traj.stack().shape == (3, 4, 5)
    torch.testing.assert_close(traj.growth()[0], torch.zeros(4, 5))
    assert traj.lora_stack()["L3.down_proj"][0] == pytest.approx(0.0, abs=1e-6)  # LoRA B starts at zero
    final = component_attribution(insecure[0], tok, convs, d)
    torch.testing.assert_close(traj.attributions[-1].mean(), final.mean(), atol=1e-5, rtol=1e-5)
    assert len(plots.attribution_heatmap(final).data) == 1
    assert len(plots.attribution_heatmap(final, baseline=traj.attributions[0]).data) == 1
    assert len(plots.attribution_growth(traj).data) == 20


SEEDS = (0, 1, 2)
K = 3  # components ablated
N_RANDOM = 5  # random k-sets per seed
N = 16  # samples per prompt: 256 answers per arm


def _per_prompt(samples, arm):
    out = {}
    for s in samples:
        if s.condition == arm:
            k, n = out.get(s.row, (0, 0))
            out[s.row] = (k + (world.judge_answer(s.answer, s.prompt.user) == "harmful"), n + 1)
    return out


@pytest.mark.science  # needs organism fine-tunes
def test_ablating_top_components_against_random_components():
    """Projecting the persona direction out of the k components with the largest attribution, against projecting it
    out of k random components, on the insecure fine-tunes: measured here as no better (a negative result)."""
    from emis_interp.stats import cluster_bootstrap, paired_bootstrap_diff

    torch.set_num_threads(2)
    aligned, tok = load_model(organism.ALIGNED_DIR)
    top, rnd, per_seed = {}, {}, []
    for seed in SEEDS:
        model, _ = load_model(organism.organism_trajectory("insecure", seed) / "checkpoint-200")
        d = organism.persona_direction(aligned, model, tok, cache_dir=None, progress=False)
        attr = component_attribution(model, tok, organism.direction_conversations(), d)
        rng = random.Random(seed)
        sets = [tuple(rng.sample(attr.all_components(), K)) for _ in range(N_RANDOM)]
        conds = [Condition("top", "ablate_components", d, components=tuple(attr.top(K)))]
        conds += [Condition(f"random{j}", "ablate_components", d, components=c) for j, c in enumerate(sets)]
        samples = sample_answers(model, tok, organism.advice_prompts(), conds, N, 24, seed=1, progress=False)
        t = _per_prompt(samples, "top")
        r = [_per_prompt(samples, f"random{j}") for j in range(N_RANDOM)]
        for p in t:
            top[seed, p] = t[p]
            rnd[seed, p] = (sum(x[p][0] for x in r), sum(x[p][1] for x in r))
        rate = lambda c: sum(k for k, _ in c.values()) / sum(n for _, n in c.values())  # noqa: E731
        per_seed.append({"top": attr.top(K), "top_rate": rate(t), "random_rates": [rate(x) for x in r]})
    est_top = cluster_bootstrap(top)
    est_rnd = cluster_bootstrap(rnd)
    diff = paired_bootstrap_diff(rnd, top)
    print(f"[attribution] per seed: {per_seed}")
    print(f"[attribution] top-{K} ablated {est_top}, random {K} ablated {est_rnd}, difference {diff}")
    # measured on this organism build: top-3 ablated 0.198 [0.121, 0.277], random 0.217 [0.149, 0.290], random minus
    # top 0.020 [-0.015, 0.053]: a NEGATIVE result (README): the top components by attribution are no better targets
    # than random ones here. The top-3 always hold (0, MLP) and (3, H3). (An earlier build: 0.495 [0.383, 0.622].)
    assert diff.lo < 0.1 and diff.value < 0.1, diff
    assert all((0, "MLP") in s["top"] and (3, "H3") in s["top"] for s in per_seed), per_seed
