import pytest
import torch

from emis_interp import capture, make_batch
from emis_interp.capture import reduce, run_backend


def test_layer_convention_matches_hf_hidden_states(tiny, convs):
    model, tok = tiny
    b = make_batch(tok, convs)
    out = run_backend(model, tok, b, [0, 1, 2])
    with torch.no_grad():
        hs = model(**b.model_inputs(), output_hidden_states=True).hidden_states
    torch.testing.assert_close(out[0], hs[1])
    torch.testing.assert_close(out[1], hs[2])
    # the last hidden_states entry is after the final norm, not layer 2's raw output
    assert not torch.allclose(out[2], hs[3])
    torch.testing.assert_close(model.model.norm(out[2]), hs[3])


@pytest.mark.parametrize("reduction", ["last_prompt", "mean_response", "mean_prompt"])
def test_backends_agree(tiny, convs, reduction):
    model, tok = tiny
    ref = capture(model, tok, convs, [0, 2], reduction, cache_dir=None, backend="torch")
    for backend in ("nnsight", "transformer_lens"):
        got = capture(model, tok, convs, [0, 2], reduction, cache_dir=None, backend=backend)
        torch.testing.assert_close(got.acts, ref.acts, atol=1e-4, rtol=1e-4, msg=backend)
    # the TL backend boots on a copy: the user's model is untouched
    assert type(model.model.layers[0]).__name__ == "Qwen2DecoderLayer"


def test_reductions_by_hand(tiny, convs):
    model, tok = tiny
    b = make_batch(tok, convs)
    h = run_backend(model, tok, b, [1])[1]
    i = 2
    real = h[i][b.response_mask[i]]
    torch.testing.assert_close(reduce(h, b, "mean_response")[i], real.mean(0))
    last = b.prompt_mask[i].nonzero().max()
    torch.testing.assert_close(reduce(h, b, "last_prompt")[i], h[i, last])


def test_result_order_is_input_order(tiny, convs):
    model, tok = tiny
    full = capture(model, tok, convs, [1], "last_prompt", cache_dir=None, batch_size=2)
    one = capture(model, tok, convs[3:4], [1], "last_prompt", cache_dir=None)
    torch.testing.assert_close(full.acts[3], one.acts[0], atol=1e-5, rtol=1e-5)


def test_all_tokens_streamed(tiny, convs, tmp_path):
    model, tok = tiny
    ta = capture(model, tok, convs, [0, 2], "all", cache_dir=tmp_path, batch_size=2)
    shards = list(ta.path.glob("shard-*.safetensors"))
    assert len(shards) == 3
    b = make_batch(tok, convs[1:2])
    h = run_backend(model, tok, b, [2])[2][0]
    torch.testing.assert_close(ta.conversation(1)[:, 1], h[b.attention_mask[0].bool()], atol=1e-5, rtol=1e-5)


def test_bad_input(tiny, convs):
    model, tok = tiny
    with pytest.raises(ValueError, match="empty"):
        capture(model, tok, [], [0], cache_dir=None)
    with pytest.raises(IndexError, match="out of range"):
        capture(model, tok, convs, [7], cache_dir=None)
    with pytest.raises(ValueError, match="response"):
        capture(model, tok, ["no answer here"], [0], "mean_response", cache_dir=None)


def test_nan_activations_raise_and_leave_no_cache(tiny, convs, tmp_path):
    model, tok = tiny
    layer = model.model.layers[0]
    h = layer.register_forward_hook(lambda m, a, o: o * float("nan"))
    try:
        with pytest.raises(FloatingPointError, match="NaN"):
            capture(model, tok, convs, [1], cache_dir=tmp_path)
    finally:
        h.remove()
    assert not any(tmp_path.rglob("*.safetensors")) and not any(tmp_path.rglob("*.tmp"))


def test_reprs(tiny, convs):
    model, tok = tiny
    a = capture(model, tok, convs, [0, 1], cache_dir=None)
    assert "Activations(n=5" in repr(a) and "<table>" in a._repr_html_()
