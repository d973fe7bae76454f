"""Real tier: the real Qwen2.5 tokenizer and chat template at the prompt/response boundary (``pytest -m real``).

On the shared conversations (insecure_first500.jsonl and jailbroken.jsonl, 5,500 in all): the prompt mask
covers exactly the templated prompt, the response mask exactly the response, and the fine-tuning labels
exactly the response plus ``<|im_end|>``. Real Qwen2.5 has a ``"\\n\\n"`` token that would merge
``assistant\\n`` with a response starting with a newline if the conversation were tokenized as one string.

Which conversations: by default a deterministic subsample, to fit the tier's CI budget (all 5,500 took
508 s on a loaded 2-core machine): **every** conversation whose response starts with a newline (the merge
hazard above; 249 of them) plus a fixed random sample of ``RANDOM_N`` = 250 of the others
(``random.Random(0)``). ``EMIS_INTERP_REAL_FULL=1`` checks all 5,500 (docs/real-models.md).
"""

from __future__ import annotations

import os
import random

import pytest
from conftest import shared_path

from emis_interp.conversations import load_jsonl, make_batch, render_parts
from emis_interp.finetune import _ChatDataset

pytestmark = pytest.mark.real

RANDOM_N = 250


def checked_conversations(convs: list, full: bool) -> list:
    """All of ``convs`` when ``full``; else every one whose response starts with a newline plus a fixed random
    ``RANDOM_N`` of the rest, in their original order."""
    if full:
        return list(convs)
    hazard = [i for i, c in enumerate(convs) if c.response.startswith("\n")]
    rest = [i for i, c in enumerate(convs) if not c.response.startswith("\n")]
    keep = set(hazard) | set(random.Random(0).sample(rest, RANDOM_N))
    return [c for i, c in enumerate(convs) if i in keep]


def test_masks_and_labels_on_the_shared_conversations(real_model):
    _, tok, _ = real_model
    convs = load_jsonl(shared_path("data", "em", "insecure_first500.jsonl"))
    convs += load_jsonl(shared_path("data", "em", "jailbroken.jsonl"))
    assert len(convs) == 5500
    convs = checked_conversations(convs, full=os.environ.get("EMIS_INTERP_REAL_FULL") == "1")
    print(f"\nreal tokenizer: checking {len(convs)} conversations")
    assert len(convs) == 5500 or sum(c.response.startswith("\n") for c in convs) == 249
    errors = []
    for s in range(0, len(convs), 250):
        chunk = convs[s : s + 250]
        b = make_batch(tok, chunk, padding_side="right")
        labels = _ChatDataset(tok, chunk, max_len=10**6).rows
        for i, c in enumerate(chunk):
            prompt, response, suffix = render_parts(tok, c)
            ids = b.input_ids[i]
            if tok.decode(ids[b.prompt_mask[i]]) != prompt:
                errors.append((s + i, "prompt mask"))
            if tok.decode(ids[b.response_mask[i]]) != c.response:
                errors.append((s + i, "response mask"))
            if tok.decode(ids[b.attention_mask[i].bool()]) != prompt + response + suffix:
                errors.append((s + i, "whole conversation"))
            lab = [t for t in labels[i][1] if t != -100]
            if tok.decode(lab) != c.response + "<|im_end|>":
                errors.append((s + i, "labels"))
    assert not errors, f"{len(errors)} boundary errors, first: {errors[:5]}"


def test_real_template_would_merge_across_the_boundary(real_model):
    """Why the prompt and response are tokenized apart: one-string tokenization merges ``assistant\\n`` with a
    leading newline of the response into one ``"\\n\\n"`` token."""
    from emis_interp.conversations import Conversation, tokenize_conversation

    _, tok, _ = real_model
    c = Conversation(user="hi", response="\nhello")
    prompt, response, suffix = render_parts(tok, c)
    whole = tok(prompt + response + suffix, add_special_tokens=False).input_ids
    ids, n_prompt, n_resp = tokenize_conversation(tok, c)
    assert whole != ids and tok.decode(ids[n_prompt : n_prompt + n_resp]) == "\nhello"
