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
    with steer(model, d, 0.0):
        assert torch.equal(gen(), ref)
    outs = {}
    for pos in ("all", "prompt", "response"):
        with steer(model, d, 1.0, positions=pos):
            outs[pos] = gen()
    assert not torch.equal(outs["all"], ref)
    # steering only the response leaves the first generated token (computed in the prefill) unchanged
    n = b.input_ids.shape[1]
    assert torch.equal(outs["response"][:, n], ref[:, n])
    assert not torch.equal(outs["prompt"][:, n], ref[:, n]) or not torch.equal(outs["prompt"], ref)


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
    # response-only steering leaves the first generated token (from the prefill) unchanged
    from emis_interp.sampling import rowwise

    b = make_batch(tok, prompts)
    gen = dict(
        input_ids=b.input_ids, attention_mask=b.attention_mask, max_new_tokens=4, min_new_tokens=4, do_sample=False
    )
    with torch.no_grad():
        base = model.generate(**gen)
        with rowwise(model, [conds[1]] * len(prompts), positions="response"):
            resp = model.generate(**gen)
        with rowwise(model, [conds[1]] * len(prompts), positions="prompt"):
            prompt_only = model.generate(**gen)
    n = b.input_ids.shape[1]
    assert torch.equal(resp[:, n], base[:, n]) and not torch.equal(resp, base)
    assert not torch.equal(prompt_only[:, n], base[:, n])
