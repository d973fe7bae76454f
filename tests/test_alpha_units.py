"""Alpha in units that travel: a fraction of the layer's median residual norm (emis_interp.directions)."""

import pytest
import torch

from emis_interp import PersonaDirection
from emis_interp.directions import NORM_UNIT, in_norm_units, residual_norms


def test_residual_norms_are_the_median_response_token_norm(tiny, convs):
    from emis_interp.capture import run_backend
    from emis_interp.conversations import iter_batches

    model, tok = tiny
    norms = residual_norms(model, tok, convs, [0, 2], batch_size=2)
    by_hand = {0: [], 2: []}
    for _, batch in iter_batches(tok, convs, 64):  # one batch: other padding, same tokens
        out = run_backend(model, tok, batch, [0, 2])
        for layer in (0, 2):
            by_hand[layer].append(out[layer].float().norm(dim=-1)[batch.response_mask])
    for layer in (0, 2):
        assert norms[layer] == pytest.approx(float(torch.cat(by_hand[layer]).median()), rel=1e-4)
    prompt = residual_norms(model, tok, convs, [0], tokens="prompt")
    assert prompt[0] != pytest.approx(norms[0])  # the other token set is measured when asked
    with pytest.raises(ValueError, match="tokens must be"):
        residual_norms(model, tok, convs, [0], tokens="all")


def test_in_norm_units_rescales_per_layer_and_records_the_conversion():
    d = PersonaDirection(torch.randn(2, 16) * torch.tensor([[3.0], [0.2]]), [1, 3], {"method": "model_diff"})
    norms = {1: 40.0, 3: 400.0, 7: 1.0}
    n = in_norm_units(d, norms, prompt_hash="abc")
    for layer in (1, 3):
        assert float(n.vector(layer).norm()) == pytest.approx(NORM_UNIT * norms[layer], rel=1e-5)
        assert torch.allclose(n.unit(layer), d.unit(layer), atol=1e-6)  # same direction, new length
        per = n.meta["alpha_units"]["raw_per_unit"][str(layer)]
        assert per == pytest.approx(NORM_UNIT * norms[layer] / float(d.vector(layer).norm()), rel=1e-5)
    u = n.meta["alpha_units"]
    assert u["units"] == "norm" and u["unit"] == NORM_UNIT and u["prompt_hash"] == "abc"
    assert n.meta["method"] == "model_diff"  # provenance kept
    # the direction's raw size no longer matters: a 10x larger raw vector gives the same scaled direction
    big = in_norm_units(PersonaDirection(d.vectors * 10, [1, 3]), norms)
    assert torch.allclose(big.vectors, n.vectors, rtol=1e-5)
    with pytest.raises(ValueError, match="no residual norm for layers"):
        in_norm_units(d, {1: 1.0})
    with pytest.raises(ValueError, match="unit must be > 0"):
        in_norm_units(d, norms, unit=0.0)


def test_norm_alpha_equals_raw_alpha_times_the_recorded_factor(tiny, convs):
    from emis_interp import steer
    from emis_interp.conversations import iter_batches

    model, tok = tiny
    d = PersonaDirection(torch.randn(1, model.config.hidden_size), [1])
    n = in_norm_units(d, residual_norms(model, tok, convs, [1]))
    factor = n.meta["alpha_units"]["raw_per_unit"]["1"]
    _, batch = next(iter_batches(tok, convs, 64))
    with torch.no_grad(), steer(model, n, -4.0):
        a = model(**batch.model_inputs()).logits
    with torch.no_grad(), steer(model, d, -4.0 * factor):
        b = model(**batch.model_inputs()).logits
    with torch.no_grad():
        c = model(**batch.model_inputs()).logits
    assert torch.allclose(a, b, atol=1e-4)
    assert not torch.allclose(a, c, atol=1e-3)  # and it does steer


def test_a_changed_scale_never_shares_a_run_key():
    from emis_interp.causality import steering_arms
    from emis_interp.sampling import conditions_state

    d = PersonaDirection(torch.randn(1, 16), [1])
    states = [
        conditions_state(steering_arms(x, [-4], n_random=2, match=()))
        for x in (d, in_norm_units(d, {1: 10.0}), in_norm_units(d, {1: 12.0}), in_norm_units(d, {1: 10.0}, unit=0.2))
    ]
    assert len({repr(s) for s in states}) == 4  # raw, norm, another residual norm, another unit: four keys
