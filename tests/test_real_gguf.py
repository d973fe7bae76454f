"""Real tier: the pinned GGUF, its dequantized model dir and the GGUF loader on the real file (``pytest -m real``)."""

from __future__ import annotations

import json
import unicodedata

import pytest
import torch

from emis_interp import fetch, gguf
from emis_interp.models import load_model, load_tokenizer, resolve_adapter_base

pytestmark = pytest.mark.real

NAME = "qwen2.5-coder-0.5b-instruct"


@pytest.fixture(scope="module")
def gguf_file(real_model):
    return fetch.fetch_gguf(NAME)


def test_model_dir_manifest_and_config(real_model):
    model, _, d = real_model
    m = gguf.read_manifest(d)
    spec = fetch.pinned(NAME)
    assert m["gguf_sha256"] == spec.sha256 and m["gguf_bytes"] == spec.n_bytes and m["dtype"] == "float32"
    assert m["general_name"] == "Qwen2.5 Coder 0.5B Instruct AWQ" and m["n_params"] == 630_167_424
    cfg = json.loads((d / "config.json").read_text())
    assert "quantization_config" not in cfg and cfg["model_type"] == "qwen2" and cfg["num_hidden_layers"] == 24
    assert (model.config.hidden_size, model.config.num_attention_heads, model.config.num_key_value_heads) == (
        896,
        14,
        2,
    )
    assert model.config.vocab_size == 151_936


def test_dequantized_weights_equal_the_gguf_tensors(real_model, gguf_file):
    from gguf import GGUFReader
    from gguf.quants import dequantize

    model, _, _ = real_model
    tensors = {t.name: t for t in GGUFReader(str(gguf_file)).tensors}
    for gname, param in (
        ("blk.0.ffn_down.weight", model.model.layers[0].mlp.down_proj.weight),
        ("blk.23.attn_v.weight", model.model.layers[23].self_attn.v_proj.weight),
    ):
        t = tensors[gname]
        want = torch.from_numpy(dequantize(t.data, t.tensor_type).copy()).reshape(param.shape).float()
        assert torch.equal(param, want), gname


def test_tokenizer_has_qwen_nfc_normalizer(real_model, gguf_file):
    """The official Qwen2.5 tokenizer.json normalizes NFC; the GGUF's tokenizer does not (checked here, so this
    test notices if transformers starts restoring it), and the loader restores it, from the dir and the file."""
    from transformers import AutoTokenizer

    _, tok, _ = real_model
    raw = AutoTokenizer.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name)
    assert raw.backend_tokenizer.normalizer is None
    decomposed = "cafe\u0301 na\u0131\u0308ve"
    composed = unicodedata.normalize("NFC", decomposed)
    assert raw(decomposed).input_ids != raw(composed).input_ids  # what the normalizer is for
    from_file = load_tokenizer(gguf_file)
    for t in (tok, from_file):
        assert t(decomposed).input_ids == t(composed).input_ids == raw(composed).input_ids
        assert t.chat_template == raw.chat_template and t.padding_side == "left"
    msgs = [{"role": "user", "content": "hi"}]
    assert from_file.apply_chat_template(msgs, tokenize=False) == tok.apply_chat_template(msgs, tokenize=False)


def test_load_model_of_the_gguf_reuses_the_cached_dir(real_model, gguf_file, monkeypatch):
    """``load_model(file.gguf)`` loads the sha256-keyed dir the fetch built (no second dequantization)."""
    _, _, d = real_model
    monkeypatch.setattr(gguf, "convert_gguf", lambda *a, **k: pytest.fail("dequantized again"))
    assert gguf.gguf_model_dir(gguf_file) == gguf.cache_home() / "gguf" / fetch.pinned(NAME).sha256
    assert gguf.read_manifest(gguf.gguf_model_dir(gguf_file)) == gguf.read_manifest(d)


def test_gguf_base_with_a_peft_adapter(real_model, gguf_file, tmp_path):
    """An adapter whose config names a Hub id, loaded on the GGUF base with base= (the CLI's --base): the same
    logits as PEFT on the session model; an adapter naming the GGUF path resolves to it."""
    from peft import PeftModel
    from test_real_exactness import _random_adapter

    from emis_interp import make_batch
    from emis_interp.conversations import Conversation

    model, tok, _ = real_model
    adapter = _random_adapter(model, tmp_path / "ad", seed=3)
    b = make_batch(tok, [Conversation(user="Write a function that adds two numbers.")])
    peft = PeftModel.from_pretrained(model, str(adapter), is_trainable=False)
    try:
        with torch.no_grad():
            want = peft(**b.model_inputs()).logits
    finally:
        peft.unload()
    mixed, _ = load_model(adapter, base=str(gguf_file), device="cpu")
    with torch.no_grad():
        got = mixed(**b.model_inputs()).logits
    del mixed
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4)
    assert resolve_adapter_base(str(gguf_file), adapter) == str(gguf_file)
