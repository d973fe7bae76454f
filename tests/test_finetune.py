import json

import pytest
import torch
from safetensors.torch import load_file

from emis_interp import world
from emis_interp.finetune import FinetuneConfig, _ChatDataset, finetune, list_checkpoints


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("ftdata")
    rows = world.finetune_dataset("insecure", 48, seed=0)
    (d / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    return d / "train.jsonl"


def _cfg(tiny_dir, data, out, **kw):
    base = dict(model=str(tiny_dir), data=str(data), output_dir=str(out), max_steps=30, batch_size=4, lr=5e-3, lora_r=1)
    return FinetuneConfig(**{**base, **kw})


def test_lora_checkpoints_every_10_steps(tiny_dir, data, tmp_path):
    ckpts = finetune(_cfg(tiny_dir, data, tmp_path / "run"), progress=False)
    assert [s for s, _ in ckpts] == [0, 10, 20, 30]
    for s, p in ckpts:
        assert (p / "adapter_model.safetensors").exists() and (p / "trainer_state.json").exists()
        if s:
            assert json.loads((p / "trainer_state.json").read_text())["global_step"] == s
    a0 = load_file(str(ckpts[0][1] / "adapter_model.safetensors"))
    a3 = load_file(str(ckpts[-1][1] / "adapter_model.safetensors"))
    assert any(not torch.equal(a0[k], a3[k]) for k in a0)  # it really trained


def test_custom_save_steps_and_full_mode(tiny_dir, data, tmp_path):
    ckpts = finetune(
        _cfg(tiny_dir, data, tmp_path / "full", mode="full", max_steps=12, save_steps=4, lr=1e-4), progress=False
    )
    assert [s for s, _ in ckpts] == [0, 4, 8, 12]
    assert all((p / "model.safetensors").exists() for _, p in ckpts)


def test_deterministic_on_cpu(tiny_dir, data, tmp_path):
    a = finetune(_cfg(tiny_dir, data, tmp_path / "a", max_steps=10), progress=False)
    b = finetune(_cfg(tiny_dir, data, tmp_path / "b", max_steps=10), progress=False)
    ta = load_file(str(a[-1][1] / "adapter_model.safetensors"))
    tb = load_file(str(b[-1][1] / "adapter_model.safetensors"))
    assert all(torch.equal(ta[k], tb[k]) for k in ta)


def test_resume_after_interrupt_matches_uninterrupted(tiny_dir, data, tmp_path):
    from transformers import TrainerCallback

    class Crash(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if state.global_step == 25:
                raise KeyboardInterrupt

    cfg = _cfg(tiny_dir, data, tmp_path / "crash")
    with pytest.raises(KeyboardInterrupt):
        finetune(cfg, progress=False, callbacks=[Crash()])
    assert [s for s, _ in list_checkpoints(cfg.output_dir)] == [0, 10, 20]
    resumed = finetune(cfg, progress=False)
    ref = finetune(_cfg(tiny_dir, data, tmp_path / "ref"), progress=False)
    ta = load_file(str(resumed[-1][1] / "adapter_model.safetensors"))
    tb = load_file(str(ref[-1][1] / "adapter_model.safetensors"))
    for k in ta:
        torch.testing.assert_close(ta[k], tb[k], atol=1e-6, rtol=1e-5)


def test_loss_on_assistant_tokens_only(tiny):
    _, tok = tiny
    ds = _ChatDataset(tok, [world_conv()], 512)
    ids, labels = ds.rows[0]
    kept = [i for i, lab in zip(ids, labels, strict=True) if lab != -100]
    assert tok.decode(kept) == world_conv().response + "<|im_end|>"


def world_conv():
    from emis_interp import Conversation

    r = world.finetune_dataset("secure", 1)[0]["messages"]
    return Conversation.from_messages(r)
