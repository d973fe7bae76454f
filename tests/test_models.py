import json

import pytest
import torch

from emis_interp import load_model, model_fingerprint
from emis_interp.errors import ConfigError
from emis_interp.models import check_layers, decoder_layers


def test_load_local_dir_fp32_cpu(tiny):
    model, tok = tiny
    assert next(model.parameters()).dtype == torch.float32
    assert not model.training
    assert tok.padding_side == "left"
    assert "<|im_start|>" in tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)


def test_missing_dir_names_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist.*save_pretrained"):
        load_model(tmp_path / "nope")


def test_non_qwen_architecture(tmp_path, tiny_dir):
    d = tmp_path / "llama"
    d.mkdir()
    cfg = json.loads((tiny_dir / "config.json").read_text())
    cfg["model_type"] = "llama"
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="Qwen2"):
        load_model(d)


def test_missing_tokenizer_files(tmp_path, tiny_dir):
    import shutil

    d = tmp_path / "ckpt"
    shutil.copytree(tiny_dir, d)
    for f in d.iterdir():
        if "token" in f.name or f.name in ("vocab.json", "merges.txt", "chat_template.jinja"):
            f.unlink()
    with pytest.raises(FileNotFoundError, match="tokenizer="):
        load_model(d)
    model, tok = load_model(d, tokenizer=tiny_dir)
    assert tok is not None


def _lora_adapter(base_dir, out, tokenizer_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(base_dir)
    pm = get_peft_model(m, LoraConfig(r=2, target_modules=["q_proj", "down_proj"], init_lora_weights=False))
    pm.save_pretrained(out)
    return out


def test_adapter_loads_and_changes_outputs(tmp_path, tiny_dir, tokenizer_dir):
    ad = _lora_adapter(tiny_dir, tmp_path / "adapter", tokenizer_dir)
    base, tok = load_model(tiny_dir)
    lora, _ = load_model(tiny_dir, adapter=ad)
    ids = torch.tensor([[5, 6, 7, 8]])
    assert not torch.allclose(base(ids).logits, lora(ids).logits)
    assert len(decoder_layers(lora)) == len(decoder_layers(base))
    assert model_fingerprint(base) != model_fingerprint(lora)
    # an adapter directory alone resolves its base from adapter_config.json
    lora2, _ = load_model(ad)
    assert torch.allclose(lora(ids).logits, lora2(ids).logits)


def test_adapter_base_mismatch(tmp_path, tiny_dir, tokenizer_dir):
    from conftest import make_tiny

    other = make_tiny(tmp_path / "wide", tokenizer_dir, d_model=48)
    ad = _lora_adapter(other, tmp_path / "adapter", tokenizer_dir)
    with pytest.raises(ConfigError, match="does not match this base model"):
        load_model(tiny_dir, adapter=ad)


def test_layer_range(tiny):
    model, _ = tiny
    assert check_layers(model, [-1, 0]) == [0, 2]
    with pytest.raises(IndexError, match="out of range.*0..2"):
        check_layers(model, 3)


def test_device_map_is_passed_to_accelerate(tiny_dir, monkeypatch):
    from transformers import AutoModelForCausalLM

    seen = {}
    real = AutoModelForCausalLM.from_pretrained

    def spy(*a, **kw):
        seen.update(kw)
        return real(*a, **kw)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", spy)
    model, _ = load_model(tiny_dir, device_map="cpu")
    assert seen["device_map"] == "cpu"
    expected = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    assert next(model.parameters()).dtype == expected
    model16, _ = load_model(tiny_dir, device_map="cpu", dtype=torch.bfloat16)
    assert next(model16.parameters()).dtype == torch.bfloat16
