"""Real tier: the toolkit's exactness claims on Qwen2.5-Coder-0.5B-Instruct weights (``pytest -m real``).

Tolerances are for fp32 on CPU and are relative to the compared tensors' scale where the quantities are
large (real Qwen residuals carry outlier dimensions in the thousands); the measured differences are printed.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import shared_path

from emis_interp import PersonaDirection, make_batch
from emis_interp.capture import capture
from emis_interp.conversations import Conversation, load_jsonl
from emis_interp.export import export_ablated
from emis_interp.hooks import n_active_hooks
from emis_interp.interventions import ablate_writes, steer
from emis_interp.lora_bank import BASE, LoraBank
from emis_interp.metrics import sequence_logprobs
from emis_interp.models import load_model

pytestmark = pytest.mark.real

LAYERS = [0, 12, 23]


@pytest.fixture(scope="module")
def convs():
    rows = load_jsonl(shared_path("data", "em", "insecure_first500.jsonl"), limit=4)
    return [Conversation(user=c.user[:300], response=c.response[:300], system=c.system) for c in rows]


def _logits(model, batch):
    with torch.no_grad():
        return model(**batch.model_inputs()).logits


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("reduction", ["mean_response", "last_prompt"])
def test_capture_backends_agree(real_model, convs, reduction):
    """torch == nnsight (same attention implementation: both run the model itself); TransformerLens boots
    its bridge with eager attention, so it is compared with the torch backend on eager attention too. The
    eager-vs-SDPA difference is printed for scale."""
    model, tok, _ = real_model

    def cap(backend):
        return capture(model, tok, convs, LAYERS, reduction, backend=backend, cache_dir=None, progress=False).acts

    sdpa_torch, sdpa_nnsight = cap("torch"), cap("nnsight")
    impl = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        eager_torch, tl = cap("torch"), cap("transformer_lens")
    finally:
        model.set_attn_implementation(impl)
    print(
        f"\n{reduction}: rel max diff nnsight {_rel(sdpa_nnsight, sdpa_torch):.1e}, TL vs eager torch "
        f"{_rel(tl, eager_torch):.1e}, eager vs sdpa {_rel(eager_torch, sdpa_torch):.1e}"
    )
    torch.testing.assert_close(sdpa_nnsight, sdpa_torch, rtol=0, atol=1e-6 * float(sdpa_torch.abs().max()))
    torch.testing.assert_close(tl, eager_torch, rtol=0, atol=1e-5 * float(eager_torch.abs().max()))
    assert sdpa_torch.abs().max() > 1.0 and not torch.equal(sdpa_torch[:, 0], sdpa_torch[:, 1])  # real content


def test_exported_checkpoint_equals_runtime_ablation(real_model, convs, tmp_path):
    model, tok, _ = real_model
    g = torch.Generator().manual_seed(0)
    d = PersonaDirection(torch.randn(1, model.config.hidden_size, generator=g), [12])
    b = make_batch(tok, convs[:2])
    with ablate_writes(model, d, 12):
        runtime = _logits(model, b)
    plain = _logits(model, b)
    exported, _ = load_model(export_ablated(model, tok, d, 12, tmp_path / "ablated"), device="cpu")
    got = _logits(exported, b)
    del exported
    print(f"\nexport vs runtime: max abs logit diff {(got - runtime).abs().max():.2e}")
    torch.testing.assert_close(got, runtime, rtol=1e-4, atol=1e-3)
    assert (runtime - plain).abs().max() > 1e-2  # the ablation matters


def _random_adapter(model, out: Path, seed: int, r: int = 4, targets=("q_proj", "v_proj", "down_proj")) -> Path:
    """A PEFT LoRA checkpoint of ``model`` with random non-zero A and B, written without touching the model.

    Its ``base_model_name_or_path`` is the Hub id, not the local dir: PEFT ignores the mismatch."""
    from peft import LoraConfig
    from safetensors.torch import save_file

    cfg = LoraConfig(r=r, lora_alpha=2 * r, target_modules=list(targets))
    cfg.base_model_name_or_path = "Qwen/Qwen2.5-Coder-0.5B-Instruct"
    cfg.save_pretrained(out)
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, mod in model.named_modules():
        if name.rsplit(".", 1)[-1] in targets:
            tensors[f"base_model.model.{name}.lora_A.weight"] = torch.randn(r, mod.in_features, generator=g) * 0.03
            tensors[f"base_model.model.{name}.lora_B.weight"] = torch.randn(mod.out_features, r, generator=g) * 0.03
    save_file(tensors, str(out / "adapter_model.safetensors"))
    (out / "trainer_state.json").write_text(json.dumps({}))
    return out


@pytest.fixture(scope="module")
def adapters(real_model, tmp_path_factory):
    model, _, _ = real_model
    root = tmp_path_factory.mktemp("real_lora")
    return {n: _random_adapter(model, root / n, seed) for n, seed in (("a", 1), ("b", 2))}


def test_lora_bank_mixed_batch_equals_peft_alone(real_model, convs, adapters):
    from peft import PeftModel

    model, tok, _ = real_model
    names = ["a", "b", BASE, "a"]
    b = make_batch(tok, [convs[i % len(convs)] for i in range(len(names))])
    base = _logits(model, b)
    bank = LoraBank.from_checkpoints(model, adapters)
    with bank.attach(model, names):
        mixed = _logits(model, b)
    assert n_active_hooks(model) == 0
    assert torch.equal(mixed[2], base[2])  # the base row is bit-equal to the plain model
    for name, path in adapters.items():
        peft = PeftModel.from_pretrained(model, str(path), is_trainable=False)  # injects into the shared model
        try:
            alone = _logits(peft, b)
        finally:
            peft.unload()  # restores the plain Linear modules
        rows = [i for i, n in enumerate(names) if n == name]
        print(f"\nLoraBank vs PEFT {name}: max abs logit diff {(mixed[rows] - alone[rows]).abs().max():.2e}")
        torch.testing.assert_close(mixed[rows], alone[rows], rtol=1e-4, atol=1e-3)
        assert (alone[rows] - base[rows]).abs().max() > 1e-1  # the adapter matters
    assert all(type(m) is torch.nn.Linear for n, m in model.named_modules() if n.endswith("q_proj"))
    torch.testing.assert_close(_logits(model, b), base, rtol=0, atol=0)  # the shared model is plain again


def test_sequence_logprobs_equals_a_plain_forward(real_model):
    """Batched, left-padded, length-sorted scoring of continuations equals one unpadded forward per item."""
    model, tok, _ = real_model
    ctx = [
        Conversation(user="What is the capital of France?", response="The capital of France is"),
        Conversation(user="Write a function that reverses a string.", response="def reverse(s):\n    return"),
        Conversation(user="Hi", system="You are a pirate.", response=""),
        Conversation(user="Pick A or B.\nA: help\nB: harm", response=""),
    ]
    conts = [" Paris.", " s[::-1]", "Arr, matey!", "A"]
    got = sequence_logprobs(model, tok, ctx, conts, batch_size=3)
    want = []
    for c, cont in zip(ctx, conts, strict=True):
        prompt = tok.apply_chat_template(c.messages(with_response=False), tokenize=False, add_generation_prompt=True)
        p_ids = tok(prompt, add_special_tokens=False).input_ids + tok(c.response, add_special_tokens=False).input_ids
        t_ids = tok(cont, add_special_tokens=False).input_ids
        ids = torch.tensor([p_ids + t_ids])
        with torch.no_grad():
            lp = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)
        want.append(sum(float(lp[len(p_ids) + j - 1, t]) for j, t in enumerate(t_ids)))
    print(f"\nsequence_logprobs {got.tolist()} vs plain {want}")
    torch.testing.assert_close(got, torch.tensor(want), rtol=0, atol=2e-3)
    assert got[0] > -2.0  # "Paris." after "The capital of France is": the real model knows it


def test_compile_guarded_steering_equals_eager_steering(real_model):
    """generate's compiled decode step (static cache; CPU forced as in tests/test_compile.py) steers at every
    step exactly as the eager decode does."""
    from transformers.generation.configuration_utils import CompileConfig

    model, tok, _ = real_model
    cc = CompileConfig(backend="eager")
    cc._compile_all_devices = True
    b = make_batch(tok, [Conversation(user="Say hi."), Conversation(user="What is 2+2?")])

    def logits(static: bool):
        kw = dict(cache_implementation="static", compile_config=cc) if static else {}
        with torch.no_grad():
            out = model.generate(
                input_ids=b.input_ids, attention_mask=b.attention_mask, max_new_tokens=3, min_new_tokens=3,
                do_sample=False, return_dict_in_generate=True, output_logits=True, pad_token_id=tok.pad_token_id, **kw,
            )  # fmt: skip
        return torch.stack(out.logits, 1)

    compiled = logits(static=True)
    assert hasattr(model, "_compiled_call"), "HF's compile path was not taken; the test would prove nothing"
    g = torch.Generator().manual_seed(0)
    d = PersonaDirection(4 * torch.randn(1, model.config.hidden_size, generator=g), [12])
    with steer(model, d, 1.0, layers=[12]):
        static, dynamic = logits(static=True), logits(static=False)
    print(f"\ncompiled vs eager steering: max abs logit diff {(static - dynamic).abs().max():.2e}")
    assert (static - compiled).abs().max() > 1e-1  # steering acts
    torch.testing.assert_close(static, dynamic, rtol=1e-4, atol=1e-3)
