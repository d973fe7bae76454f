import torch

from emis_interp import Conversation, make_batch
from emis_interp.capture import run_backend


def test_masks(tiny, convs):
    _, tok = tiny
    b = make_batch(tok, convs)
    assert b.input_ids.shape == b.prompt_mask.shape == b.response_mask.shape
    assert not (b.prompt_mask & b.response_mask).any()
    for i, c in enumerate(convs):
        resp = tok.decode(b.input_ids[i][b.response_mask[i]])
        assert resp == c.response
        prompt = tok.decode(b.input_ids[i][b.prompt_mask[i]])
        assert prompt.endswith("<|im_start|>assistant\n") and c.user in prompt
    assert (b.attention_mask[:, -1] == 1).all()  # left padded


def test_padding_side_does_not_change_results(tiny, convs):
    model, tok = tiny
    left, right = make_batch(tok, convs, "left"), make_batch(tok, convs, "right")
    hl = run_backend(model, tok, left, [0, 2])
    hr = run_backend(model, tok, right, [0, 2])
    for layer in (0, 2):
        a = hl[layer][left.attention_mask.bool()]
        b = hr[layer][right.attention_mask.bool()]
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    # and a conversation alone equals it in a padded batch
    alone = run_backend(model, tok, make_batch(tok, [convs[0]]), [2])[2][0]
    torch.testing.assert_close(alone, hl[2][0][left.attention_mask[0].bool()], atol=1e-5, rtol=1e-5)


def test_from_messages():
    c = Conversation.from_messages([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}])
    assert c == Conversation(user="a", response="b")
