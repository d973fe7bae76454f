import pytest
import torch

from emis_interp import PersonaDirection, ablate, make_batch, steer
from emis_interp.capture import run_backend
from emis_interp.hooks import n_active_hooks


def _direction(model, layers=(1,), seed=0):
    g = torch.Generator().manual_seed(seed)
    return PersonaDirection(torch.randn(len(layers), model.config.hidden_size, generator=g), list(layers))


def _logits(model, batch):
    with torch.no_grad():
        return model(**batch.model_inputs()).logits


def test_alpha_zero_is_exact_noop(tiny, convs):
    model, tok = tiny
    b = make_batch(tok, convs)
    ref = _logits(model, b)
    with steer(model, _direction(model), 0.0):
        torch.testing.assert_close(_logits(model, b), ref, rtol=0, atol=0)
    with steer(model, _direction(model), torch.zeros(len(convs))):
        torch.testing.assert_close(_logits(model, b), ref, rtol=0, atol=0)


def test_steer_adds_alpha_times_vector(tiny, convs):
    model, tok = tiny
    b = make_batch(tok, convs)
    d = _direction(model)
    base = run_backend(model, tok, b, [1])[1]
    with steer(model, d, 2.5):
        got = run_backend(model, tok, b, [1])[1]
    torch.testing.assert_close(got - base, (2.5 * d.vector(1)).expand_as(got), atol=1e-5, rtol=1e-5)


def test_per_row_alpha_equals_separate_runs(tiny, convs):
    model, tok = tiny
    b = make_batch(tok, convs)
    d = _direction(model)
    alphas = torch.tensor([0.0, 1.0, -2.0, 4.0, 0.5])
    with steer(model, d, alphas):
        batched = _logits(model, b)
    for i, a in enumerate(alphas.tolist()):
        with steer(model, d, a):
            torch.testing.assert_close(batched[i], _logits(model, b)[i], atol=1e-5, rtol=1e-5)


def test_response_mask_positions(tiny, convs):
    model, tok = tiny
    b = make_batch(tok, convs)
    d = _direction(model)
    base = run_backend(model, tok, b, [1])[1]
    with steer(model, d, 1.0, positions=b.response_mask):
        got = run_backend(model, tok, b, [1])[1]
    changed = (got - base).abs().sum(-1) > 0
    assert torch.equal(changed, b.response_mask)


def test_ablation_zeroes_projection(tiny, convs):
    model, tok = tiny
    b = make_batch(tok, convs)
    d = _direction(model, layers=(0, 2))
    with ablate(model, d):
        out = run_backend(model, tok, b, [0, 2])
    for layer in (0, 2):
        proj = out[layer] @ d.unit(layer)
        assert proj.abs().max() < 1e-4
    base = run_backend(model, tok, b, [2])[2]
    assert (base @ d.unit(2)).abs().max() > 1e-2


def test_hooks_removed_after_exception(tiny):
    model, _ = tiny
    with pytest.raises(RuntimeError, match="boom"):
        with steer(model, _direction(model), 1.0):
            assert n_active_hooks(model) > 0
            raise RuntimeError("boom")
    assert n_active_hooks(model) == 0
    with pytest.raises(RuntimeError, match="boom"):
        with ablate(model, _direction(model)):
            raise RuntimeError("boom")
    assert n_active_hooks(model) == 0


def test_generation_positions(tiny, convs):
    model, tok = tiny
    b = make_batch(tok, [c.__class__(user=c.user) for c in convs[:2]])
    d = _direction(model, layers=(0, 1, 2), seed=3)
    d = PersonaDirection(d.vectors * 50, d.layers)

    def gen(**kw):
        with torch.no_grad():
            return model.generate(
                **{k: v for k, v in b.model_inputs().items() if k != "position_ids"},
                max_new_tokens=6,
                do_sample=False,
                **kw,
            )

    ref = gen()
    with steer(model, d, 0.0, layers=[0, 1, 2]):
        assert torch.equal(gen(), ref)
    outs = {}
    for pos in ("all", "prompt", "response"):
        with steer(model, d, 1.0, layers=[0, 1, 2], positions=pos):
            outs[pos] = gen()
    n = b.input_ids.shape[1]
    for pos in ("all", "prompt", "response"):  # all three steer the last prompt position: the first answer token moves
        assert not torch.equal(outs[pos][:, n], ref[:, n]), pos


def test_bad_inputs(tiny):
    model, _ = tiny
    with pytest.raises(ValueError, match="finite"):
        with steer(model, _direction(model), float("nan")):
            pass
    wrong = PersonaDirection(torch.randn(1, 7), [1])
    with pytest.raises(ValueError, match="d_model=7"):
        with steer(model, wrong, 1.0):
            pass
    with pytest.raises(IndexError, match="out of range"):
        with steer(model, _direction(model), 1.0, layers=[9]):
            pass


def test_steering_is_seen_by_the_nnsight_backend(tiny, convs):
    from emis_interp import capture

    model, tok = tiny
    d = _direction(model)
    ref = capture(model, tok, convs, [1, 2], cache_dir=None, backend="torch")
    with steer(model, d, 3.0):
        a = capture(model, tok, convs, [1, 2], cache_dir=None, backend="torch")
        b = capture(model, tok, convs, [1, 2], cache_dir=None, backend="nnsight")
    torch.testing.assert_close(
        a.acts[:, 0] - ref.acts[:, 0], (3.0 * d.vector(1)).expand_as(a.acts[:, 0]), atol=1e-4, rtol=1e-4
    )
    # downstream of the steered layer, nnsight sees the steering exactly as the torch backend does
    torch.testing.assert_close(a.acts[:, 1], b.acts[:, 1], atol=1e-4, rtol=1e-4)
    assert not torch.allclose(a.acts[:, 1], ref.acts[:, 1])
    # at the steered layer itself nnsight reports the module's output *before* forward hooks
    torch.testing.assert_close(b.acts[:, 0], ref.acts[:, 0], atol=1e-4, rtol=1e-4)


def test_static_cache_and_rowwise_match_dynamic(tiny, convs):
    from emis_interp.sampling import Condition, sample_answers

    model, tok = tiny
    prompts = [c.__class__(user=c.user) for c in convs[:3]]
    d = PersonaDirection(_direction(model).vectors * 20, [1])
    conds = [Condition("base"), Condition("s", "steer", d, 1.0), Condition("a", "ablate", d)]
    kw = dict(n_samples=1, max_new_tokens=5, temperature=0, progress=False)
    dyn = sample_answers(model, tok, prompts, conds, **kw)
    sta = sample_answers(model, tok, prompts, conds, cache_implementation="static", **kw)
    assert [s.answer for s in dyn] == [s.answer for s in sta]
    # per-row conditions equal running each condition alone
    for c in conds:
        alone = sample_answers(model, tok, prompts, [c], **kw)
        assert [s.answer for s in alone] == [s.answer for s in dyn if s.condition == c.name]
    # per-row rowwise steering equals steer() under every positions setting, in generation
    from emis_interp.sampling import rowwise

    b = make_batch(tok, prompts)
    gen = dict(
        input_ids=b.input_ids, attention_mask=b.attention_mask, max_new_tokens=4, min_new_tokens=4, do_sample=False
    )
    with torch.no_grad():
        for pos in ("prompt", "response"):
            with rowwise(model, [conds[0], conds[1], conds[0]], positions=pos):
                mixed = model.generate(**gen)
            with steer(model, d, 1.0, positions=pos):
                alone = model.generate(**gen)
            base = model.generate(**gen)
            assert torch.equal(mixed[1], alone[1]) and torch.equal(mixed[[0, 2]], base[[0, 2]])


# --- the engine: devices, hook accounting, positions -------------------------------------------------


def test_steer_needs_layers_when_the_direction_covers_several(tiny):
    from emis_interp.sampling import Condition

    model, _ = tiny
    d = _direction(model, layers=(0, 1, 2))
    with pytest.raises(ValueError, match=r"layers=\[1\]"):
        with steer(model, d, 1.0):
            pass
    with pytest.raises(ValueError, match="accumulate"):
        Condition("s", "steer", d, 1.0)
    assert n_active_hooks(model) == 0
    with steer(model, d, 1.0, layers=[1]):  # explicit layers, or a one-layer direction, are fine
        assert n_active_hooks(model) > 0
    with steer(model, d.select(1), 1.0):
        assert n_active_hooks(model) > 0


def test_n_active_hooks_counts_hooks_on_every_submodule(tiny, convs):
    from emis_interp.hooks import remove_all_hooks
    from emis_interp.interventions import ablate_writes

    model, tok = tiny
    n_layers = model.config.num_hidden_layers
    b = make_batch(tok, convs)
    ref = _logits(model, b)
    with ablate_writes(model, _direction(model), 1):  # hooks on embed_tokens, every o_proj and down_proj
        assert n_active_hooks(model) == 1 + 2 * n_layers + 1  # + the decoder stack's phase pre-hook
        assert model.generation_config.disable_compile is True
        remove_all_hooks(model)  # the crashed-notebook escape hatch clears them all, and the compile guard
        assert n_active_hooks(model) == 0
        assert model.generation_config.disable_compile is not True
        torch.testing.assert_close(_logits(model, b), ref, rtol=0, atol=0)
    assert n_active_hooks(model) == 0


def _shard_onto(model, first: int, device: str):
    """A copy of ``model`` whose decoder layers ``first..`` (and final norm, head) sit on ``device``, with
    accelerate-style pre-hooks moving every tensor input there (as a ``device_map`` does)."""
    import copy

    from torch.utils._pytree import tree_map

    m = copy.deepcopy(model)
    to = lambda x: x.to(device) if isinstance(x, torch.Tensor) else x  # noqa: E731
    for mod in [*m.model.layers[first:], m.model.norm, m.lm_head]:
        mod.to(device)
        mod.register_forward_pre_hook(lambda mod, args, kwargs: tree_map(to, (args, kwargs)), with_kwargs=True)
    return m


def test_rowwise_on_a_model_sharded_across_devices(tiny, convs):
    """Layers 0-1 on CPU, layer 2 on another device ("meta" stands in for a second GPU): the old rowwise
    moved every vector to the first parameter's device and crashed at layer 2."""
    from emis_interp.sampling import Condition, rowwise

    model, tok = tiny
    b = make_batch(tok, convs[:3])
    d = _direction(model, layers=(1, 2))
    conds = [Condition("s1", "steer", d, 2.0, (1, 2)), Condition("a", "ablate", d), Condition("base")]
    sharded = _shard_onto(model, 2, "meta")
    seen = {}
    with torch.no_grad(), rowwise(sharded, conds):
        h = sharded.model.layers[1].register_forward_hook(lambda m, a, o: seen.setdefault("l1", o))  # after ours
        logits = sharded(**b.model_inputs(), use_cache=False).logits
        h.remove()
    assert logits.device.type == "meta" and logits.shape == (3, b.input_ids.shape[1], model.config.vocab_size)
    # the CPU half is computed exactly as on the unsharded model
    ref = {}
    with torch.no_grad(), rowwise(model, conds):
        g = model.model.layers[1].register_forward_hook(lambda m, a, o: ref.setdefault("l1", o))
        model(**b.model_inputs(), use_cache=False)
        g.remove()
    assert seen["l1"].device.type == "cpu"
    torch.testing.assert_close(seen["l1"], ref["l1"], rtol=0, atol=0)


def test_engine_moves_vectors_once_per_device(tiny, convs, monkeypatch):
    from emis_interp.interventions import Intervention

    model, tok = tiny
    calls = []
    orig = Intervention._source
    monkeypatch.setattr(Intervention, "_source", lambda self, key: calls.append(key) or orig(self, key))
    b = make_batch(tok, [c.__class__(user=c.user) for c in convs[:2]])
    d = _direction(model, layers=(0, 2))
    with torch.no_grad(), steer(model, d, 1.0, layers=[0, 2]):
        model.generate(input_ids=b.input_ids, attention_mask=b.attention_mask, max_new_tokens=6, do_sample=False)
    assert sorted(calls) == [("add", 0), ("add", 2)]  # 6 forward steps, one move per (layer, device, dtype)


def _greedy_logits(model, b, n_new, **kw):
    with torch.no_grad():
        out = model.generate(
            input_ids=b.input_ids, attention_mask=b.attention_mask, max_new_tokens=n_new, min_new_tokens=n_new,
            do_sample=False, return_dict_in_generate=True, output_logits=True, **kw,
        )  # fmt: skip
    return out.sequences, torch.stack(out.logits, 1)


def _teacher_forced_logits(model, seqs, attention_mask, mask, d, alpha, layer):
    full = torch.cat([attention_mask, torch.ones_like(seqs[:, attention_mask.shape[1] :])], 1)
    pos = (full.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad(), steer(model, d, alpha, layers=[layer], positions=mask):
        return model(input_ids=seqs, attention_mask=full, position_ids=pos, use_cache=False).logits


@pytest.mark.parametrize("positions", ["response", "prompt"])
@pytest.mark.parametrize("cache", [None, "static"])
def test_generation_positions_match_a_manual_teacher_forced_pass(tiny, convs, positions, cache):
    """ "response" = the last prompt position in the prefill (it yields the first answer token) + every
    generated token; "prompt" = the prefill positions only. Each generate step's logits equal a
    teacher-forced pass over the generated sequence with exactly those positions steered. (The old
    code never steered "response" at all in transformers 5, and skipped the first answer token.)"""
    model, tok = tiny
    b = make_batch(tok, [c.__class__(user=c.user) for c in convs[:3]])
    d = PersonaDirection(_direction(model, seed=4).vectors * 30, [1])
    kw = {"cache_implementation": cache} if cache else {}
    plain_seqs, plain = _greedy_logits(model, b, 3, **kw)
    with steer(model, d, 1.0, positions=positions):
        seqs, got = _greedy_logits(model, b, 3, **kw)
    n = b.input_ids.shape[1]
    assert not torch.allclose(got[:, 0], plain[:, 0], atol=1e-3)  # the first answer token's logits move
    mask = torch.zeros(seqs.shape, dtype=torch.bool)
    if positions == "response":
        mask[:, n - 1 :] = True
    else:
        mask[:, :n] = True
    manual = _teacher_forced_logits(model, seqs, b.attention_mask, mask, d, 1.0, 1)
    torch.testing.assert_close(got, manual[:, n - 1 : -1], atol=2e-5, rtol=1e-5)


def test_response_positions_need_generation_or_a_mask(tiny, convs):
    model, tok = tiny
    b = make_batch(tok, convs)
    d = _direction(model)
    for pos in ("response", "prompt"):
        with pytest.raises(ValueError, match="positions=batch.response_mask"):
            with steer(model, d, 1.0, positions=pos):
                _logits(model, b)
    with pytest.raises(ValueError, match="does not match"):
        with steer(model, d, 1.0, positions=b.response_mask[:, 1:]):
            _logits(model, b)
    # right padding cannot say where each prompt ends in the prefill
    right = make_batch(tok, [c.__class__(user=c.user) for c in convs[:2]])
    ids, am = right.input_ids, right.attention_mask
    k = (am == 0).sum(-1)
    ids = torch.stack([torch.roll(r, -int(s)) for r, s in zip(ids, k, strict=True)])
    am = torch.stack([torch.roll(r, -int(s)) for r, s in zip(am, k, strict=True)])
    assert (am[:, -1] == 0).any()
    with pytest.raises(ValueError, match="left padding"):
        with torch.no_grad(), steer(model, d, 1.0, positions="response"):
            model.generate(input_ids=ids, attention_mask=am, max_new_tokens=2, do_sample=False)
    assert n_active_hooks(model) == 0


def test_residual_hooks_phase_is_decided_once_per_pass(tiny, convs):
    """Regression: every layer after 0 saw the cache layer 0 had just filled and called the prefill a decode step;
    a continuation chunk on a filled cache was called a decode step too."""
    from transformers import DynamicCache

    from emis_interp.hooks import residual_hooks

    model, tok = tiny
    b = make_batch(tok, convs[:2])
    seen = []
    with residual_hooks(
        model, {layer: (lambda lay, r, info: seen.append((lay, r.shape[1], info["phase"]))) for layer in (0, 1, 2)}
    ):
        assert model.generation_config.disable_compile  # generate may not compile hooks away
        model.generate(input_ids=b.input_ids, attention_mask=b.attention_mask, max_new_tokens=3, do_sample=False)
    n = b.input_ids.shape[1]
    assert seen[:3] == [(0, n, "prefill"), (1, n, "prefill"), (2, n, "prefill")]
    assert {p for _, t, p in seen[3:]} == {"decode"} and {t for _, t, _ in seen[3:]} == {1}
    seen.clear()
    cache = DynamicCache(config=model.config)
    with torch.no_grad(), residual_hooks(model, {1: (lambda lay, r, info: seen.append(info["phase"]))}):
        model(input_ids=b.input_ids[:1], past_key_values=cache, use_cache=True)
        model(input_ids=b.input_ids[:1, :3], past_key_values=cache, use_cache=True)  # a 3-token continuation
        model(input_ids=b.input_ids[:1, :1], past_key_values=cache, use_cache=True)
    assert seen == ["prefill", "prefill", "decode"]


def test_project_out_bf16_keeps_at_most_one_rounding():
    from emis_interp.interventions import project_out

    g = torch.Generator().manual_seed(0)
    x = (torch.randn(64, 512, generator=g) * 20).to(torch.bfloat16)
    u = torch.randn(512, generator=g)
    u = u / u.norm()
    before = (x.float() @ u).abs().mean()
    after = (project_out(x, u.to(torch.bfloat16)).float() @ u).abs().mean()
    assert project_out(x, u).dtype == torch.bfloat16
    # one bf16 rounding of x (relative 2^-8 per element) leaves ~|x| * 2^-8 along u; a bf16 subtraction leaves more
    assert after < 0.02 * before, (before, after)
    # fp32 is exact to float precision
    xf = x.float()
    torch.testing.assert_close(project_out(xf, u) @ u, torch.zeros(64), atol=1e-4, rtol=0)


def test_mean_ablation_sets_the_component_at_every_position(tiny, convs):
    """``Condition(ablate_to=...)``: after the layer the component along the unit vector equals the given value at
    every position (0 for plain ablation), rows of other conditions untouched; the value is in the arm's state."""
    from emis_interp.models import decoder_layers
    from emis_interp.sampling import Condition, conditions_state, rowwise

    model, tok = tiny
    d = _direction(model, layers=(1, 2))
    to = ((1, -1.5), (2, 0.75))
    conds = [Condition("base"), Condition("zero", "ablate", d), Condition("mean", "ablate", d, ablate_to=to)]
    b = make_batch(tok, convs[:1] * 3)
    seen = {}
    with torch.no_grad(), rowwise(model, conds):
        hooks = [
            decoder_layers(model)[layer].register_forward_hook(lambda m, i, o, layer=layer: seen.__setitem__(layer, o))
            for layer in (1, 2)
        ]
        try:
            model(**b.model_inputs())
        finally:
            for h in hooks:
                h.remove()
    for layer, value in to:
        out = seen[layer][0] if isinstance(seen[layer], tuple) else seen[layer]
        proj = out.float() @ d.unit(layer)
        torch.testing.assert_close(proj[2], torch.full_like(proj[2], value), atol=1e-4, rtol=0)
        torch.testing.assert_close(proj[1], torch.zeros_like(proj[1]), atol=1e-4, rtol=0)
        assert (proj[0] - value).abs().min() > 1e-3  # the baseline row keeps its own component
    assert conditions_state(conds[2:]) != conditions_state([Condition("mean", "ablate", d)])
    assert conditions_state(conds[2:]) != conditions_state(
        [Condition("mean", "ablate", d, ablate_to=((1, -1.5), (2, 0)))]
    )
    # one cache key per setting, whatever the order of the pairs
    assert conditions_state(conds[2:]) == conditions_state([Condition("mean", "ablate", d, ablate_to=to[::-1])])
    with pytest.raises(ValueError, match="twice"):
        Condition("m", "ablate", d, ablate_to=((1, 0.5), (1, 0.25), (2, 0.0)))
    with pytest.raises(ValueError, match="needs a direction"):
        Condition("m", "ablate", None, ablate_to=((1, 0.5),))
    with pytest.raises(ValueError, match="kind='ablate'"):
        Condition("s", "steer", d.select(1), 1.0, ablate_to=((1, 0.5),))
    with pytest.raises(ValueError, match="one \\(layer, value\\) per ablated layer"):
        Condition("m", "ablate", d, ablate_to=((1, 0.5),))
    with pytest.raises(ValueError, match="positions='all'"):
        with rowwise(model, conds, positions="response"):
            pass
