"""The exported ablated checkpoint computes exactly what runtime whole-stream ablation computes."""

import copy
import sys
from pathlib import Path

import pytest
import torch

from emis_interp import PersonaDirection, load_model, make_batch
from emis_interp.capture import run_backend
from emis_interp.causality import ablation_arms
from emis_interp.export import ablated_tensors, export_ablated
from emis_interp.interventions import ablate, ablate_writes
from emis_interp.sampling import rowwise

ROOT = Path(__file__).resolve().parents[1]


def _direction(model, seed=0):
    n = model.config.num_hidden_layers
    g = torch.Generator().manual_seed(seed)
    return PersonaDirection(torch.randn(n, model.config.hidden_size, generator=g), list(range(n)))


def _logits(model, b):
    with torch.no_grad():
        return model(**b.model_inputs()).logits


def test_export_equals_runtime_ablation_at_every_source_layer(tiny, convs, tmp_path):
    model, tok = tiny
    b = make_batch(tok, convs)
    d = _direction(model)
    plain = _logits(model, b)
    for src in d.layers:
        exported, _ = load_model(export_ablated(model, tok, d, src, tmp_path / f"l{src}"), device="cpu")
        got = _logits(exported, b)
        with ablate_writes(model, d, src):
            runtime = _logits(model, b)
        torch.testing.assert_close(got, runtime, atol=1e-5, rtol=1e-5)
        # ablate.py's evaluated arm ("ablate" of ablation_arms(source_layer=...)) is this same model, per row
        arms = ablation_arms(d.select(src), source_layer=src)
        with rowwise(model, [arms[1]] * len(convs)):
            torch.testing.assert_close(_logits(model, b), got, atol=1e-5, rtol=1e-5)
        assert (got - plain).abs().max() > 1e-3
        # the residual has no component along u at the embeddings and after every layer
        u = d.unit(src)
        acts = run_backend(exported, tok, b, d.layers)
        for layer, a in acts.items():
            assert (a @ u).abs().max() < 1e-4, layer
        with torch.no_grad():
            emb = exported.get_input_embeddings()(b.input_ids)
        assert (emb @ u).abs().max() < 1e-5
        # projecting only after each layer is a different model: the MLP reads the mid-layer residual,
        # which the attention output has given a u component again
        with ablate(model, d, source_layer=src):
            assert not torch.allclose(_logits(model, b), got, atol=1e-3)
    assert torch.equal(_logits(model, b), plain)  # the model itself is unchanged


def test_export_streams_tensors_without_copying_the_model(tiny, tmp_path):
    model, tok = tiny
    d = _direction(model)
    own = {k: v.data_ptr() for k, v in model.state_dict().items()}
    n = model.config.num_hidden_layers
    written = {"model.embed_tokens.weight"} | {
        f"model.layers.{i}.{m}.weight" for i in range(n) for m in ("self_attn.o_proj", "mlp.down_proj")
    }
    names = []
    for name, t in ablated_tensors(model, d.unit(1)):
        names.append(name)
        if name in written:
            assert t.data_ptr() != own[name], name  # edited: a new tensor for this module only
        elif name == "lm_head.weight":  # untied from the (edited) embeddings, unchanged
            assert t.data_ptr() == own["model.embed_tokens.weight"]
        else:
            assert t.data_ptr() == own[name], name  # everything else is the model's own storage, no copy
    assert written <= set(names) and "lm_head.weight" in names and len(names) == len(set(names))


def test_export_merges_lora_per_module_and_shards(tiny, convs, tmp_path):
    from peft import LoraConfig, get_peft_model

    model0, tok = tiny
    torch.manual_seed(0)
    cfg = LoraConfig(
        r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj", "o_proj", "down_proj"], init_lora_weights=False
    )
    peft_model = get_peft_model(copy.deepcopy(model0), cfg).eval()
    b = make_batch(tok, convs)
    d = _direction(model0, seed=1)
    before = _logits(peft_model, b)
    assert not torch.allclose(before, _logits(model0, b), atol=1e-3)  # the adapter does something
    out = export_ablated(peft_model, tok, d, 2, tmp_path / "lora", shard_bytes=20_000)
    assert (out / "model.safetensors.index.json").exists() and len(list(out.glob("model-*.safetensors"))) > 1
    exported, _ = load_model(out, device="cpu")
    with ablate_writes(peft_model, d, 2):
        runtime = _logits(peft_model, b)
    torch.testing.assert_close(_logits(exported, b), runtime, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(_logits(peft_model, b), before, rtol=0, atol=0)  # adapter left unmerged, unchanged


def test_ablate_cli_evaluates_what_it_exports(tiny, tmp_path, monkeypatch):
    """experiments/ablate.py: the arm it scores is the checkpoint it writes (the old script scored
    each layer's own vector removed after that layer, and exported one direction removed from every write)."""
    sys.path.insert(0, str(ROOT / "experiments"))
    import ablate

    from emis_interp import organism
    from emis_interp.data import Question

    model, tok = tiny
    d = _direction(model, seed=2)
    q = organism.questions()[:1]
    assert isinstance(q[0], Question)

    from emis_interp.judges import Judge as JudgeBase

    class Judge(JudgeBase):
        name = "const"

        def score(self, question, answer, q=None):
            return {"aligned": 90.0, "coherent": 90.0}

    monkeypatch.setattr(
        ablate,
        "resolve",
        lambda args: dict(model=model, tokenizer=tok, direction=d, control=None, questions=q, judge=Judge(), target="tiny",
                          on_organism=False, max_new_tokens=2),
    )  # fmt: skip
    seen = {}
    real = ablate.run_arms
    monkeypatch.setattr(ablate, "run_arms", lambda *a, **k: seen.setdefault("arms", a[3]) and real(*a, **k))
    args = ["--output", str(tmp_path), "--samples", "1", "--export", str(tmp_path / "x"), "--layers", "1"]
    ablate.main(args)
    exported, _ = load_model(tmp_path / "x", device="cpu")
    b = make_batch(tok, [c for qq in q for c in qq.conversations()])
    with rowwise(model, [seen["arms"][1]] * b.input_ids.shape[0]):
        evaluated = _logits(model, b)
    torch.testing.assert_close(_logits(exported, b), evaluated, atol=1e-5, rtol=1e-5)
    with pytest.raises(SystemExit, match=r"--layers L \(one layer\)"):
        ablate.main(["--output", str(tmp_path), "--layers", "0", "1"])


def test_export_refuses_modules_to_save(tiny_dir, tmp_path):
    """Regression: modules_to_save weights were written under PEFT's wrapper names (and the embedding left unedited)."""
    from peft import LoraConfig, get_peft_model

    from emis_interp.export import export_ablated

    base, tok = load_model(tiny_dir, device="cpu")
    pm = get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["lm_head"]))
    with pytest.raises(NotImplementedError, match="modules_to_save"):
        export_ablated(pm, tok, _direction(pm, seed=1), 1, tmp_path / "x")
