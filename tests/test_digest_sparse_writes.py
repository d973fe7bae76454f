"""The weights digest sees writes that bypass the version counter (``.data``, fused optimizers such as the HF
Trainer's default ``adamw_torch_fused``) when they change whole rows, as a training step on the rows a batch touched
does; before, only a strided sample of ~4096 values per tensor backed them up, which such a write usually misses."""

from __future__ import annotations

import pytest
import torch

from emis_interp.fingerprint import weights_digest
from emis_interp.models import load_model


@pytest.fixture(scope="module")
def wide_vocab_dir(tmp_path_factory, tokenizer_dir):
    """A tiny Qwen2 with a 20,000-row embedding: most of its rows lie between the strided sample's points."""
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    path = tmp_path_factory.mktemp("wide")
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=20_000, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=True, pad_token_id=tok.pad_token_id)  # fmt: skip
    Qwen2ForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def _unsampled_row(w: torch.Tensor, sample: int = 4096) -> int:
    """A row none of whose values the old strided sample (every ``numel // sample``-th 16-bit word) reads."""
    words_per_row = w[0].numel() * w.element_size() // 2
    stride = max(1, w.numel() * w.element_size() // 2 // sample)
    for r in range(1, w.shape[0]):
        lo, hi = r * words_per_row, (r + 1) * words_per_row
        if (lo + stride - 1) // stride * stride >= hi:  # no multiple of the stride inside the row
            return r
    raise AssertionError("every row is sampled: the model is too small for this test")


def test_fused_optimizer_step_on_a_few_rows_changes_the_digest(wide_vocab_dir):
    model, _ = load_model(wide_vocab_dir)  # as loaded: its digest stands on the files' content
    emb = model.get_input_embeddings().weight
    row = _unsampled_row(emb)
    d0 = weights_digest(model)
    emb.requires_grad_(True)
    opt = torch.optim.AdamW([emb], lr=1e-2, weight_decay=0.0, fused=True)
    v = emb._version
    emb.grad = torch.zeros_like(emb)
    emb.grad[row] = 1.0  # a batch that touched one token
    opt.step()
    assert emb._version == v  # the fused step leaves the version counter alone (why this test exists)
    assert weights_digest(model) != d0


def test_a_row_written_through_data_changes_the_digest(wide_vocab_dir):
    model, _ = load_model(wide_vocab_dir)
    w = model.model.layers[0].mlp.up_proj.weight
    big = model.get_input_embeddings().weight
    d0 = weights_digest(model)
    big.data[_unsampled_row(big)] += 1e-3  # .data: no version bump
    assert weights_digest(model) != d0
    d1 = weights_digest(model)
    w.data[1] *= 1.0001  # a small relative change (low mantissa bits only)
    assert weights_digest(model) != d1
