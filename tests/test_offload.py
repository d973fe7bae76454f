"""Regression (issue 25 item 2): models loaded with CPU/disk offload (``device_map`` with "disk" entries).

Offloaded weights sit on the meta device; ``copy_``/``zero_`` on them do nothing, so a trajectory silently stayed at
its first checkpoint, and the weights digest skipped them, so caches did not notice a different model either.
"""

import pytest
import torch
from conftest import make_tiny

from emis_interp import load_model
from emis_interp.errors import ConfigError
from emis_interp.fingerprint import weights_digest
from emis_interp.trajectory import Trajectory, _verify

OFFLOAD = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk", "model.layers.2": "disk",
           "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}  # fmt: skip


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # disk offload writes a copy of the weights file under the working directory


def _offloaded(path, folder):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, device_map=OFFLOAD, offload_folder=str(folder))
    assert model.model.layers[1].self_attn.q_proj.weight.device.type == "meta"  # really offloaded
    return model


def _lora_run(tiny_dir, out):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    for step in (10, 20):
        torch.manual_seed(step)
        m = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_dir), LoraConfig(r=2, target_modules=["q_proj"]))
        for n, p in m.named_parameters():
            if "lora_B" in n:
                p.data.normal_()
        m.save_pretrained(out / f"checkpoint-{step}")
    return Trajectory.from_dir(out, base=str(tiny_dir))


def test_lora_swap_into_offloaded_model_refuses(tiny_dir, tmp_path):
    from peft import LoraConfig, get_peft_model

    traj = _lora_run(tiny_dir, tmp_path / "run")
    # (PeftModel.from_pretrained re-dispatches a CPU/disk map with model.to("cpu"), which fails on CPU-only hosts;
    # on a GPU host it leaves the offloaded layers' adapters on the meta device, as get_peft_model does here)
    model = get_peft_model(_offloaded(tiny_dir, tmp_path / "off"), LoraConfig(r=2, target_modules=["q_proj"]))
    for i in range(len(traj)):  # step 0 zeroes B, steps 10 and 20 copy it: each would write meta tensors
        with pytest.raises(ConfigError, match="offloaded.*device_map"):
            traj.goto(model, i)
    resident, _ = traj.load()  # the same trajectory without offload swaps and verifies every tensor
    for i in (2, 0, 1):
        traj.goto(resident, i)


def test_full_swap_into_offloaded_model_refuses(tiny_dir, tokenizer_dir, tmp_path):
    other = make_tiny(tmp_path / "run" / "checkpoint-10", tokenizer_dir, seed=1)
    traj = Trajectory.from_dir(tmp_path / "run", base=str(tiny_dir))
    model = _offloaded(tiny_dir, tmp_path / "off")
    with pytest.raises(ConfigError, match="offloaded.*load_model"):
        traj.goto(model, 1)
    resident, _ = load_model(tiny_dir)
    traj.goto(resident, 1)
    fresh, _ = load_model(other)
    want = fresh.state_dict()
    assert all(torch.equal(v, want[k]) for k, v in resident.state_dict().items())


def test_verify_names_a_write_that_did_not_land():
    with pytest.raises(ConfigError, match="does not hold the checkpoint"):
        _verify("ckpt", [("w", torch.zeros(3), torch.ones(3))])
    with pytest.raises(ConfigError, match="does not hold"):
        _verify("ckpt", [("b", torch.ones(3), None)])
    _verify("ckpt", [("w", torch.tensor([float("nan"), 1.0]), torch.tensor([float("nan"), 1.0]))])


def test_digest_sees_offloaded_weights(tiny_dir, tokenizer_dir, tmp_path):
    """Two models that differ only in an offloaded layer get different digests (meta tensors were skipped)."""
    from transformers import AutoModelForCausalLM

    edited = tmp_path / "edited"
    m = AutoModelForCausalLM.from_pretrained(tiny_dir)
    with torch.no_grad():
        m.model.layers[1].self_attn.q_proj.weight.mul_(2)
    m.save_pretrained(edited)
    a, b = _offloaded(tiny_dir, tmp_path / "a"), _offloaded(edited, tmp_path / "b")
    b.config._name_or_path = a.config._name_or_path  # the same config: only the offloaded weights differ
    assert weights_digest(a) != weights_digest(b)
    assert weights_digest(a) == weights_digest(_offloaded(tiny_dir, tmp_path / "c"))


def test_lora_swap_refuses_a_checkpoint_that_leaves_live_adapter_tensors_unwritten(tiny_dir, tmp_path):
    """Every live adapter tensor is written by a swap: one the checkpoint lacks would keep the last step's values."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    out = tmp_path / "run"
    for step, targets in ((10, ["q_proj", "v_proj"]), (20, ["q_proj"])):
        torch.manual_seed(step)
        m = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_dir), LoraConfig(r=2, target_modules=targets))
        for n, p in m.named_parameters():
            if "lora_B" in n:
                p.data.normal_()
        m.save_pretrained(out / f"checkpoint-{step}")
    traj = Trajectory.from_dir(out, base=str(tiny_dir))
    model, _ = traj.load()  # adapts q_proj and v_proj, as checkpoint-10
    traj.goto(model, traj.steps.index(10))
    with pytest.raises(ConfigError, match="no value for .*v_proj"):
        traj.goto(model, traj.steps.index(20))
