import copy

import pytest
import torch
from conftest import shared_path

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


# --- real Qwen2.5 tokenization at the prompt/response boundary (issue #9 §4) ---------------------

QWEN25_DEFAULT_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
# Qwen2.5-Instruct's chat template without its tool-calling branches: a default system prompt when none is given.
QWEN25_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>system\\n" + QWEN25_DEFAULT_SYSTEM + "<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if (message.role == 'user') or (message.role == 'system' and not loop.first) or message.role == 'assistant' %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
EM_FILES = ("insecure_first500.jsonl", "jailbroken.jsonl")


@pytest.fixture(scope="module")
def em_convs():
    from emis_interp import load_jsonl

    return {f: load_jsonl(shared_path("data", "em", f)) for f in EM_FILES}


@pytest.fixture(scope="module")
def qwen_tok(em_convs):
    """A byte-level BPE with Qwen2's split regex, trained on the EM data so it has Qwen2.5's "\\n\\n" token."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    from emis_interp.organism.model import SPECIAL_TOKENS, _bpe_merges

    corpus = [QWEN25_DEFAULT_SYSTEM, "system", "user", "assistant"]
    for convs in em_convs.values():
        corpus += [t for c in convs[:300] for t in (c.system, c.user, c.response) if t]
    bpe = Tokenizer(models.BPE())
    bpe.normalizer = normalizers.NFC()
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=2000,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(corpus, trainer)
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in _bpe_merges(bpe)]
    tok = Qwen2Tokenizer(vocab=bpe.get_vocab(), merges=merges, errors="replace")
    tok.add_special_tokens({"additional_special_tokens": SPECIAL_TOKENS[1:]})
    tok.chat_template = QWEN25_TEMPLATE
    tok.eos_token, tok.pad_token = "<|im_end|>", "<|endoftext|>"
    return tok


def test_qwen_like_tokenizer_merges_newlines_across_the_old_boundary(qwen_tok, em_convs):
    """The fixture really reproduces the bug: the old full-text tokenization breaks the prompt prefix."""
    assert "ĊĊ" in qwen_tok.get_vocab()  # byte-level "\n\n", one token as in real Qwen2.5
    assert qwen_tok.convert_ids_to_tokens(qwen_tok.encode("assistant\n\nx"))[-2] == "ĊĊ"
    broken = []
    for c in em_convs["insecure_first500.jsonl"]:
        prompt = qwen_tok.apply_chat_template(c.messages(False), tokenize=False, add_generation_prompt=True)
        full = qwen_tok.apply_chat_template(c.messages(), tokenize=False)
        p = qwen_tok.encode(prompt, add_special_tokens=False)
        if qwen_tok.encode(full, add_special_tokens=False)[: len(p)] != p:
            broken.append(c)
    assert len(broken) == 17 and all(c.response.startswith("\n") for c in broken)


def _check_rows(tok, convs, batch):
    """Prompt tokens decode to the rendered prompt, response tokens to the response, then the template's suffix."""
    ids = [r[batch.attention_mask[i].bool()].tolist() for i, r in enumerate(batch.input_ids)]
    prompts = [r[m].tolist() for r, m in zip(batch.input_ids, batch.prompt_mask, strict=True)]
    resps = [r[m].tolist() for r, m in zip(batch.input_ids, batch.response_mask, strict=True)]
    tails = [x[len(p) + len(r) :] for x, p, r in zip(ids, prompts, resps, strict=True)]
    for c, p, r, t in zip(
        convs, tok.batch_decode(prompts), tok.batch_decode(resps), tok.batch_decode(tails), strict=True
    ):
        assert p == tok.apply_chat_template(c.messages(False), tokenize=False, add_generation_prompt=True)
        assert r == c.response and t == "<|im_end|>\n"
        assert c.system is not None or p.startswith(f"<|im_start|>system\n{QWEN25_DEFAULT_SYSTEM}<|im_end|>\n")
    # where a response starts with a newline, the prompt's tokens are still those of the prompt alone
    # (as make_batch tokenizes a prompt to be answered, so activations at the prompt do not depend on the answer)
    nl = [i for i, c in enumerate(convs) if c.response.startswith("\n")]
    alone = make_batch(tok, [Conversation(user=convs[i].user, system=convs[i].system) for i in nl], "right")
    assert [prompts[i] for i in nl] == [r[m].tolist() for r, m in zip(alone.input_ids, alone.prompt_mask, strict=True)]


def test_real_em_data_masks_with_qwen_tokenizer(qwen_tok, em_convs):
    """Every conversation of the real insecure and jailbroken files: exact prompt/response split."""
    n_newline = 0
    for convs in em_convs.values():
        n_newline += sum(c.response.startswith("\n") for c in convs)
        for s in range(0, len(convs), 500):
            chunk = convs[s : s + 500]
            _check_rows(qwen_tok, chunk, make_batch(qwen_tok, chunk, padding_side="left" if s % 1000 else "right"))
    assert n_newline == 17 + 232  # the answers that start with a newline (and used to crash) were covered


def test_finetune_labels_are_response_and_im_end_on_real_data(qwen_tok, em_convs):
    from emis_interp.finetune import _ChatDataset

    convs = em_convs["insecure_first500.jsonl"] + [
        c for c in em_convs["jailbroken.jsonl"] if c.response.startswith("\n")
    ]
    ds = _ChatDataset(qwen_tok, convs, max_len=100_000)
    kept = [[i for i, lab in zip(ids, labels, strict=True) if lab != -100] for ids, labels in ds.rows]
    for ids, labels in ds.rows:
        assert all(lab in (-100, i) for i, lab in zip(ids, labels, strict=True))
    assert qwen_tok.batch_decode(kept) == [c.response + "<|im_end|>" for c in convs]


def test_template_that_rewrites_content_is_rejected(tiny):
    _, tok = tiny
    tok = copy.deepcopy(tok)
    tok.chat_template = tok.chat_template.replace("message['content']", "message['content'] | trim")
    with pytest.raises(ValueError, match="verbatim"):
        make_batch(tok, [Conversation(user="hi", response=" padded answer ")])
