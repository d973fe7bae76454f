import json

import pytest
import torch
from safetensors.torch import load_file

from emis_interp.finetune import FinetuneConfig, _ChatDataset, finetune, list_checkpoints
from emis_interp.organism import world


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
    # resume state (optimizer, scheduler, RNG) is kept in the newest checkpoint only
    assert [s for s, p in ckpts if (p / "optimizer.pt").exists()] == [30]
    assert not any((p / "rng_state.pth").exists() for s, p in ckpts if s < 30)


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


# --- resumable output identity (manifest) ---------------------------------------------------------


def test_rerun_under_other_config_refuses_names_field_and_overwrite_retrains(tiny_dir, data, tmp_path):
    from emis_interp.manifest import ManifestMismatch

    out = tmp_path / "run"
    first = finetune(_cfg(tiny_dir, data, out, max_steps=10, save_steps=5), progress=False)
    a10 = load_file(str(first[-1][1] / "adapter_model.safetensors"))
    with pytest.raises(ManifestMismatch, match=r"lr.*--overwrite"):
        finetune(_cfg(tiny_dir, data, out, max_steps=10, save_steps=5, lr=1e-3), progress=False)
    other = tmp_path / "other.jsonl"
    other.write_text("\n".join(json.dumps(r) for r in world.finetune_dataset("secure", 48, seed=0)))
    with pytest.raises(ManifestMismatch, match=r"data.*--overwrite"):
        finetune(_cfg(tiny_dir, other, out, max_steps=10, save_steps=5), progress=False)
    # the refused reruns left the old run alone
    assert all(torch.equal(v, load_file(str(first[-1][1] / "adapter_model.safetensors"))[k]) for k, v in a10.items())
    again = finetune(_cfg(tiny_dir, data, out, max_steps=10, save_steps=5, lr=1e-3, overwrite=True), progress=False)
    b10 = load_file(str(again[-1][1] / "adapter_model.safetensors"))
    assert any(not torch.equal(a10[k], b10[k]) for k in a10)  # retrained under the new lr
    ref = finetune(_cfg(tiny_dir, data, tmp_path / "ref", max_steps=10, save_steps=5, lr=1e-3), progress=False)
    rb = load_file(str(ref[-1][1] / "adapter_model.safetensors"))
    assert all(torch.equal(rb[k], b10[k]) for k in rb)  # ... from scratch, nothing of the old run resumed
    assert json.loads((out / "finetune_config.json").read_text())["lr"] == 1e-3


def test_same_config_rerun_resumes_without_retraining(tiny_dir, data, tmp_path):
    out = tmp_path / "run"
    finetune(_cfg(tiny_dir, data, out, max_steps=5, save_steps=5), progress=False)
    stamp = (out / "checkpoint-5" / "adapter_model.safetensors").stat().st_mtime_ns
    assert (out / "manifest.json").exists()
    finetune(_cfg(tiny_dir, data, out, max_steps=5, save_steps=5), progress=False)  # output_dir-independent identity
    assert (out / "checkpoint-5" / "adapter_model.safetensors").stat().st_mtime_ns == stamp


def test_unidentified_old_run_is_not_resumed(tiny_dir, data, tmp_path):
    from emis_interp.manifest import ManifestMismatch

    out = tmp_path / "old"
    (out / "checkpoint-10").mkdir(parents=True)  # a run made before manifests existed
    with pytest.raises(ManifestMismatch, match="--overwrite"):
        finetune(_cfg(tiny_dir, data, out, max_steps=5, save_steps=5), progress=False)


# --- precision ---------------------------------------------------------------------------------------


def test_precision_plan_fp32_trainable_params_on_cuda():
    from emis_interp.finetune import precision_plan

    full = precision_plan("full", "cuda")
    assert full.load_dtype == torch.float32 and full.trainable_dtype == torch.float32 and full.bf16_autocast
    lora = precision_plan("lora", "cuda")
    assert lora.load_dtype == torch.bfloat16 and lora.trainable_dtype == torch.float32 and lora.bf16_autocast
    cpu = precision_plan("full", "cpu")
    assert cpu.load_dtype == torch.float32 and not cpu.bf16_autocast


def test_full_finetune_keeps_fp32_master_weights_so_1e5_updates_land(tiny_dir, data, tmp_path, monkeypatch):
    """A real Trainer step at lr 1e-5: fp32 parameters move; the same update applied in bf16 rounds away.

    ``load_model`` defaults to bf16 on CUDA; that default is simulated here on CPU, so a fine-tune that
    relied on it (training in pure bf16) fails this test."""
    from transformers import TrainerCallback

    import emis_interp.models as models

    monkeypatch.setattr(models, "default_dtype", lambda device: torch.bfloat16)
    seen = {}

    class Spy(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kw):
            seen["dtypes"] = {p.dtype for p in model.parameters() if p.requires_grad}

    cfg = _cfg(tiny_dir, data, tmp_path / "full", mode="full", max_steps=1, save_steps=1, lr=1e-5, warmup_steps=0)
    ckpts = finetune(cfg, progress=False, callbacks=[Spy()])
    assert seen["dtypes"] == {torch.float32}
    key = "model.layers.0.self_attn.q_proj.weight"
    w0 = load_file(str(ckpts[0][1] / "model.safetensors"))[key]
    w1 = load_file(str(ckpts[1][1] / "model.safetensors"))[key]
    assert w1.dtype == torch.float32
    delta = w1 - w0
    assert (delta != 0).float().mean() > 0.9  # the update landed on (nearly) every weight
    assert delta.abs().max() < 2e-5  # and it is a 1e-5-sized Adam step
    # pure bf16 weights: p_bf16 + delta rounds back to p_bf16 for most weights
    p = w0.to(torch.bfloat16)
    assert ((p + delta.to(torch.bfloat16)) == p).float().mean() > 0.8


def test_lora_adapter_params_fp32_on_bf16_base(tiny_dir):
    from emis_interp import load_model
    from emis_interp.finetune import FinetuneConfig, _apply_lora, precision_plan

    model, _ = load_model(tiny_dir, device="cpu", dtype=torch.bfloat16)
    pm = _apply_lora(
        model, FinetuneConfig(model=str(tiny_dir), data="x", output_dir="y"), precision_plan("lora", "cuda")
    )
    trainable = [p for p in pm.parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 for p in trainable)
    assert all(p.dtype == torch.bfloat16 for p in pm.parameters() if not p.requires_grad)


# --- large-model options -------------------------------------------------------------------------------


def test_gradient_checkpointing_and_device_map_reach_model_and_trainer(tiny_dir, data, tmp_path, monkeypatch):
    from transformers import TrainerCallback

    import emis_interp.models as models

    real, loads = models.load_model, []

    def spy(*a, **kw):
        loads.append(kw)
        return real(*a, **kw)

    monkeypatch.setattr(models, "load_model", spy)
    seen = {}

    class Spy(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kw):
            inner = model.get_base_model() if hasattr(model, "get_base_model") else model
            seen["args"] = (args.gradient_checkpointing, args.gradient_checkpointing_kwargs)
            seen["gc"] = inner.is_gradient_checkpointing
            seen["use_cache"] = inner.config.use_cache

    for mode in ("lora", "full"):
        cfg = _cfg(
            tiny_dir, data, tmp_path / mode, mode=mode, max_steps=2, save_steps=2,
            gradient_checkpointing=True, device_map="cpu",
        )  # fmt: skip
        ckpts = finetune(cfg, progress=False, callbacks=[Spy()])
        assert loads[-1]["device_map"] == "cpu", mode
        assert seen == {"args": (True, {"use_reentrant": False}), "gc": True, "use_cache": False}, mode
        assert [s for s, _ in ckpts] == [0, 2]
        seen.clear()


def test_finetune_cli_passes_large_model_options(monkeypatch, tmp_path):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))
    import finetune as ft_cli

    got = []
    monkeypatch.setattr(ft_cli, "finetune", lambda cfg, **kw: got.append(cfg) or [])
    ft_cli.main(["--data", "d.jsonl", "--output", str(tmp_path), "--gradient-checkpointing", "--device-map", "auto"])
    ft_cli.main(["--data", "d.jsonl", "--output", str(tmp_path), "--overwrite", "--revision", "abc"])
    assert (got[0].gradient_checkpointing, got[0].device_map, got[0].overwrite) == (True, "auto", False)
    assert (got[1].gradient_checkpointing, got[1].device_map, got[1].overwrite, got[1].revision) == (
        False, None, True, "abc",
    )  # fmt: skip


# --- adapter base as given ------------------------------------------------------------------------------


def test_adapter_stores_base_as_given_and_loads_from_anywhere(tiny_dir, data, tmp_path, monkeypatch):
    import os

    from emis_interp import load_model

    monkeypatch.chdir(tiny_dir.parent)
    out = tmp_path / "run"
    ckpts = finetune(_cfg(tiny_dir.name, data, out, max_steps=5, save_steps=5), progress=False)
    for _, p in ckpts:  # relative, exactly as typed
        assert json.loads((p / "adapter_config.json").read_text())["base_model_name_or_path"] == tiny_dir.name
    ids = torch.tensor([[5, 6, 7, 8]])
    ref = load_model(ckpts[-1][1], device="cpu")[0](ids).logits  # found relative to the CWD
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    with pytest.raises(FileNotFoundError, match="--base"):
        load_model(ckpts[-1][1], device="cpu")
    via_base = load_model(ckpts[-1][1], base=tiny_dir, device="cpu")[0](ids).logits  # --base overrides it
    via_adapter_kw = load_model(tiny_dir, adapter=ckpts[-1][1], device="cpu")[0](ids).logits
    torch.testing.assert_close(via_base, ref)
    torch.testing.assert_close(via_adapter_kw, ref)
    # a base stored relative to the adapter dir loads from any CWD
    cfg_file = ckpts[-1][1] / "adapter_config.json"
    c = json.loads(cfg_file.read_text())
    c["base_model_name_or_path"] = os.path.relpath(tiny_dir, ckpts[-1][1])
    cfg_file.write_text(json.dumps(c))
    torch.testing.assert_close(load_model(ckpts[-1][1], device="cpu")[0](ids).logits, ref)


def test_adapter_base_resolution_hf_id_and_moved_organism(tmp_path):
    from emis_interp import organism
    from emis_interp.models import resolve_adapter_base

    assert resolve_adapter_base("Qwen/Qwen2.5-7B-Instruct", tmp_path) == "Qwen/Qwen2.5-7B-Instruct"
    for moved in (
        "/old/checkout/emis_interp/organism_weights/aligned",
        "/old/checkout/emis_interp/organism/weights/aligned",
    ):
        assert resolve_adapter_base(moved, tmp_path) == str(organism.ALIGNED_DIR)  # the organism's registered resolver
    with pytest.raises(FileNotFoundError, match="--base"):
        resolve_adapter_base("/old/checkout/base-model", tmp_path)


# --- train-time interventions: CAFT ablation and preventative steering ------------------------------------


def _dirs(*vectors, layers=(0, 1, 2)):
    from emis_interp import PersonaDirection

    return [PersonaDirection(torch.stack([v.float()] * len(layers)), list(layers), {"method": "test"}) for v in vectors]


def _unit(seed: int, d: int = 32) -> torch.Tensor:
    v = torch.randn(d, generator=torch.Generator().manual_seed(seed))
    return v / v.norm()


def _resid(out):
    return out[0] if isinstance(out, tuple) else out


def resid_recorder(layers):
    """A TrainerCallback putting two raw torch hooks (not emis_interp's) on each given decoder layer while
    training: one runs before every other forward hook on the layer (the layer's own output), one after all
    of them (what the next layer reads). It records ``(layer, before, after)`` for every training forward
    pass, and how many emis_interp hooks are on the model at each step."""
    from transformers import TrainerCallback

    from emis_interp.hooks import n_active_hooks
    from emis_interp.models import decoder_layers

    class ResidRecorder(TrainerCallback):
        def __init__(self):
            self.pairs, self.active, self.handles, self.model, self._cur = [], [], [], None, {}

        def on_train_begin(self, args, state, control, model=None, **kw):
            self.model = model
            blocks = decoder_layers(model)
            for layer in layers:

                def first(mod, a, out, layer=layer):
                    if mod.training and torch.is_grad_enabled():
                        self._cur[layer] = _resid(out).detach().clone()

                def last(mod, a, out, layer=layer):
                    if mod.training and torch.is_grad_enabled():
                        self.pairs.append((layer, self._cur.pop(layer), _resid(out).detach().clone()))

                self.handles.append(blocks[layer].register_forward_hook(first, prepend=True))
                self.handles.append(blocks[layer].register_forward_hook(last))

        def on_step_begin(self, args, state, control, model=None, **kw):
            self.active.append(n_active_hooks(model))

        def on_train_end(self, args, state, control, **kw):
            for h in self.handles:
                h.remove()

    return ResidRecorder()


@pytest.fixture(scope="module")
def plain_run(tiny_dir, data, tmp_path_factory):
    out = tmp_path_factory.mktemp("plain") / "run"
    return finetune(_cfg(tiny_dir, data, out, max_steps=4, save_steps=2), progress=False)


def test_train_intervention_validates_inputs():
    from emis_interp import PersonaDirection
    from emis_interp.errors import ConfigError
    from emis_interp.train_interventions import TrainIntervention

    (d,) = _dirs(_unit(0))
    with pytest.raises(ConfigError, match="unknown intervention kind 'project'.*ablate"):
        TrainIntervention("project", d, [1])
    with pytest.raises(ConfigError, match=r"no vector for layer\(s\) \[5\].*covers layers \[0, 1, 2\]"):
        TrainIntervention("ablate", d, [1, 5])
    for coef in (0, float("nan")):
        with pytest.raises(ConfigError, match="steer' needs a finite non-zero coef"):
            TrainIntervention("steer", d, [1], coef=coef)
    with pytest.raises(ConfigError, match="only for kind='steer'"):
        TrainIntervention("ablate", d, [1], coef=2.0)
    with pytest.raises(ConfigError, match="adds one direction, got 2"):
        TrainIntervention("steer", _dirs(_unit(0), _unit(1)), [1], coef=2.0)
    with pytest.raises(ConfigError, match="linearly dependent"):
        TrainIntervention("ablate", _dirs(_unit(0), 3 * _unit(0)), [1])
    with pytest.raises(ConfigError, match="no layers"):
        TrainIntervention("ablate", d, [])
    with pytest.raises(ConfigError, match="differ in d_model"):
        TrainIntervention("ablate", [d, PersonaDirection(torch.ones(1, 16), [1])], [1])
    with pytest.raises(ConfigError, match="zero at layer"):
        TrainIntervention("ablate", PersonaDirection(torch.zeros(1, 32), [1]), [1])
    with pytest.raises(ConfigError, match="unknown ablate_to 'median'"):
        TrainIntervention("ablate", d, [1], ablate_to="median")
    with pytest.raises(ConfigError, match="ablate_to='mean' is for kind='ablate'"):
        TrainIntervention("steer", d, [1], coef=2.0, ablate_to="mean")
    iv = TrainIntervention("steer", d, 1, coef=5)  # one direction and an int layer are normalised
    assert iv.directions == (d,) and iv.layers == (1,) and iv.coef == 5.0


def test_misfit_intervention_refused_before_anything_is_written(tiny_dir, data, tmp_path):
    from emis_interp import PersonaDirection
    from emis_interp.errors import ConfigError
    from emis_interp.train_interventions import TrainIntervention

    wide = TrainIntervention("ablate", PersonaDirection(torch.ones(1, 64), [1]), [1])
    with pytest.raises(ConfigError, match="d_model=64 but the model has d_model=32"):
        finetune(_cfg(tiny_dir, data, tmp_path / "a", max_steps=2, save_steps=2), progress=False, intervention=wide)
    deep = TrainIntervention("ablate", PersonaDirection(torch.ones(1, 32), [7]), [7])
    with pytest.raises(ConfigError, match=r"layers \[7\] are out of range.*3 decoder layers"):
        finetune(_cfg(tiny_dir, data, tmp_path / "b", max_steps=2, save_steps=2), progress=False, intervention=deep)
    for name in ("a", "b"):  # no manifest: the corrected rerun is not refused as a mismatch
        assert not (tmp_path / name).exists() or not any((tmp_path / name).iterdir())


def test_steering_acts_on_every_training_forward_and_changes_what_is_learned(tiny_dir, data, tmp_path, plain_run):
    from emis_interp import hooks
    from emis_interp.train_interventions import TrainIntervention

    (d,) = _dirs(_unit(0))
    iv = TrainIntervention("steer", d, [1], coef=3.0)
    rec = resid_recorder([1])
    n_ours = len(hooks._OURS)
    ckpts = finetune(
        _cfg(tiny_dir, data, tmp_path / "steer", max_steps=4, save_steps=2), progress=False, callbacks=[rec],
        intervention=iv,
    )  # fmt: skip
    # every training forward pass (one per step here) was steered: + 3 * v at every position of every row
    assert len(rec.pairs) == 4 and all(n > 0 for n in rec.active) and len(rec.active) == 4
    for _, before, after in rec.pairs:
        torch.testing.assert_close(after - before, (3.0 * d.vector(1)).expand_as(before), atol=1e-5, rtol=0)
    assert hooks.n_active_hooks(rec.model) == 0 and len(hooks._OURS) == n_ours  # nothing left on anything
    a = load_file(str(ckpts[-1][1] / "adapter_model.safetensors"))
    b = load_file(str(plain_run[-1][1] / "adapter_model.safetensors"))
    assert any(not torch.equal(a[k], b[k]) for k in a)
    # gradients flow back through the steered layer: layer 0's adapter learns something else too
    assert any(not torch.equal(a[k], b[k]) for k in a if ".layers.0." in k)
    # the step-0 checkpoint is taken before the hooks go on: the same as the plain run's
    a0 = load_file(str(ckpts[0][1] / "adapter_model.safetensors"))
    b0 = load_file(str(plain_run[0][1] / "adapter_model.safetensors"))
    assert all(torch.equal(a0[k], b0[k]) for k in a0)


def test_ablation_of_a_direction_set_removes_its_span_in_training_forwards(tiny_dir, data, tmp_path):
    from emis_interp.interventions import project_out
    from emis_interp.train_interventions import TrainIntervention

    u1, r = _unit(1), _unit(2)
    r = r - (r @ u1) * u1
    v2 = 0.8 * u1 + 0.6 * r / r.norm()  # not orthogonal to u1: sequential projection would be wrong
    dirs = _dirs(2.0 * u1, 5.0 * v2)
    iv = TrainIntervention("ablate", dirs, [0, 2])
    rec = resid_recorder([0, 2])
    finetune(
        _cfg(tiny_dir, data, tmp_path / "caft", max_steps=2, save_steps=2), progress=False, callbacks=[rec],
        intervention=iv,
    )  # fmt: skip
    q, _ = torch.linalg.qr(torch.stack([u1, v2]).double().T)  # reference basis of the span
    q = q.T.float()
    assert sorted(layer for layer, _, _ in rec.pairs) == [0, 0, 2, 2]
    for _, before, after in rec.pairs:
        torch.testing.assert_close(after, before - (before @ q.T) @ q, atol=1e-5, rtol=1e-5)
        for v in (u1, v2):  # ~0 component left along either direction, from a sizeable one
            assert (after @ v).abs().max() < 1e-5 * before.norm(dim=-1).max()
        assert (before @ v2).abs().max() > 1e-2 * before.norm(dim=-1).max()
        naive = project_out(project_out(before, u1), v2)
        assert (naive - after).abs().max() > 1e-3  # the test tells span removal from sequential projection


def test_mean_ablation_sets_the_span_to_the_base_models_mean_in_training_forwards(tiny_dir, data, tmp_path):
    import warnings

    from emis_interp import PersonaDirection, load_jsonl, load_model
    from emis_interp.errors import ConfigError
    from emis_interp.manifest import ManifestMismatch
    from emis_interp.train_interventions import (
        BASE_PROJECTION_EXAMPLES,
        INTERVENTION_FILE,
        AblationSignWarning,
        TrainIntervention,
        mean_projection,
        mean_residual,
    )

    model, tok = load_model(tiny_dir, device="cpu")
    m = mean_residual(model, tok, load_jsonl(data), [0, 2], n_examples=BASE_PROJECTION_EXAMPLES)  # the base's mean
    u1, r = _unit(21), _unit(22)
    r = r - (r @ u1) * u1
    v2 = 0.6 * u1 + 0.8 * r / r.norm()  # not orthogonal to u1
    # the first direction is the base mean's own direction at layer 0, negated: zero-ablating it would push
    # towards +direction (a sign warning); mean-ablation keeps the mean and warns of nothing
    d1 = PersonaDirection(torch.stack([-m[0] / m[0].norm(), u1]), [0, 2], {"method": "test"})
    dirs = [d1, _dirs(3.0 * v2, layers=(0, 2))[0]]
    iv = TrainIntervention("ablate", dirs, [2, 0], ablate_to="mean")
    rec = resid_recorder([0, 2])
    cfg = _cfg(tiny_dir, data, tmp_path / "mean", max_steps=2, save_steps=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error", AblationSignWarning)
        finetune(cfg, progress=False, callbacks=[rec], intervention=iv)
    assert sorted(layer for layer, _, _ in rec.pairs) == [0, 0, 2, 2]
    for layer, before, after in rec.pairs:
        q, _ = torch.linalg.qr(torch.stack([d.vector(layer) for d in dirs]).double().T)
        q = q.T.float()
        kept = m[[0, 2].index(layer)] @ q.T  # the base mean's coordinates in the span
        torch.testing.assert_close(after, before - (before @ q.T) @ q + kept @ q, atol=1e-5, rtol=1e-5)
        # every position's span coordinates are the base mean's, whatever they were before
        torch.testing.assert_close(after @ q.T, kept.expand_as(after @ q.T), atol=1e-5, rtol=1e-5)
        assert (before @ q.T - kept).abs().max() > 1e-2 * before.norm(dim=-1).max()  # it had to move them
        assert kept.abs().max() > 1e-3  # a non-zero mean: zero-ablation would give another result
    report = json.loads((tmp_path / "mean" / INTERVENTION_FILE).read_text())
    assert report["ablate_to"] == "mean" and report["warnings"] == []
    from emis_interp.capture import capture_code
    from emis_interp.manifest import read_manifest

    fields = read_manifest(tmp_path / "mean").fields  # what computes the reference mean is in the manifest
    assert fields["intervention"]["reference"] == {"capture": capture_code(), "n_examples": BASE_PROJECTION_EXAMPLES}
    assert fields["device_type"] == ("cuda" if torch.cuda.is_available() else "cpu")
    set_to = {(x["basis_vector"], x["layer"]): x["value"] for x in report["base_projection"]["set_to"]}
    assert sorted(set_to) == [(0, 0), (0, 2), (1, 0), (1, 2)]
    # basis vector 0 is direction 0's unit vector up to sign (QR), so its value is +-direction 0's mean
    # projection, which is -|m_0| (the direction is -m_0's)
    row0 = next(x for x in report["base_projection"]["rows"] if (x["direction"], x["layer"]) == (0, 0))
    assert row0["mean_projection"] == pytest.approx(-float(m[0].norm()), rel=1e-4)
    assert abs(set_to[(0, 0)]) == pytest.approx(float(m[0].norm()), rel=1e-4)
    q0, _ = torch.linalg.qr(torch.stack([d.vector(0) for d in dirs]).double().T)
    span = float(((q0 @ q0.T).float() @ m[0]).norm())
    assert report["base_projection"]["span_norm"]["0"] == pytest.approx(span, rel=1e-4)
    assert span == pytest.approx(float(m[0].norm()), rel=1e-4)  # m_0 lies in the span (direction 0 is -m_0)
    with pytest.raises(ValueError, match="sorted and distinct"):
        mean_projection(m, [2, 0], dirs[0])
    with pytest.raises(ManifestMismatch, match=r"ablate_to"):  # zero- and mean-ablation are different runs
        finetune(cfg, progress=False, intervention=TrainIntervention("ablate", dirs, [0, 2]))
    with pytest.raises(ConfigError, match="needs the base model's mean residual"):
        iv.ablations()
    with pytest.raises(ConfigError, match="zero-ablation .* takes none"):
        TrainIntervention("ablate", dirs, [0, 2]).ablations(m)


def test_ablation_hooks_reach_peft_layers_and_gradients_flow_like_the_reference(tiny_dir, convs):
    from emis_interp import load_model, make_batch
    from emis_interp.finetune import _apply_lora, precision_plan
    from emis_interp.hooks import n_active_hooks
    from emis_interp.models import decoder_layers
    from emis_interp.train_interventions import TrainIntervention

    model, tok = load_model(tiny_dir, device="cpu")
    cfg = FinetuneConfig(model=str(tiny_dir), data="x", output_dir="y", lora_r=2)
    pm = _apply_lora(model.requires_grad_(True).train(), cfg, precision_plan("lora", "cpu"))
    torch.manual_seed(0)
    for n, p in pm.named_parameters():
        if "lora_B" in n:
            p.data.normal_(0, 0.2)  # non-zero B, so that every adapter matrix gets a gradient
    params = [p for p in pm.parameters() if p.requires_grad]
    batch = make_batch(tok, convs)
    labels = torch.where(batch.attention_mask.bool(), batch.input_ids, -100)

    def grads():
        return torch.autograd.grad(pm(**batch.model_inputs(), labels=labels).loss, params)

    u1, u2 = _unit(3), _unit(4)
    iv = TrainIntervention("ablate", _dirs(u1, u2), [1])
    plain = grads()
    with iv.attach(pm):
        assert n_active_hooks(pm) > 0
        hooked = grads()
    assert n_active_hooks(pm) == 0
    q, _ = torch.linalg.qr(torch.stack([u1, u2]).double().T)
    q = q.T.float()

    def reference(mod, a, out):
        h = _resid(out)
        h = h - (h @ q.T) @ q
        return (h, *out[1:]) if isinstance(out, tuple) else h

    handle = decoder_layers(pm)[1].register_forward_hook(reference)
    try:
        ref = grads()
    finally:
        handle.remove()
    for g, r in zip(hooked, ref, strict=True):
        torch.testing.assert_close(g, r, atol=1e-6, rtol=1e-5)
    names = [n for n, p in pm.named_parameters() if p.requires_grad]
    upstream = [i for i, n in enumerate(names) if ".layers.0." in n]
    assert all(hooked[i].abs().sum() > 0 for i in upstream)  # gradients flow through the hook to layer 0
    assert any(not torch.allclose(hooked[i], plain[i]) for i in upstream)  # ... and the ablation shapes them


def test_checkpoints_carry_no_hooks_and_no_trace_of_the_intervention(tiny_dir, data, tmp_path, plain_run):
    from transformers import TrainerCallback

    from emis_interp import hooks, load_model
    from emis_interp.train_interventions import TrainIntervention

    class Keep(TrainerCallback):
        def on_train_end(self, args, state, control, model=None, **kw):
            self.model = model

    (d,) = _dirs(_unit(5))
    iv = TrainIntervention("steer", d, [1], coef=3.0)
    keep, n_ours = Keep(), len(hooks._OURS)
    ckpts = finetune(
        _cfg(tiny_dir, data, tmp_path / "steer", max_steps=4, save_steps=2), progress=False, callbacks=[keep],
        intervention=iv,
    )  # fmt: skip
    trained = keep.model.eval()
    assert hooks.n_active_hooks(trained) == 0 and len(hooks._OURS) == n_ours
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    with torch.no_grad():
        want = trained(ids).logits
        with iv.attach(trained):
            steered = trained(ids).logits
        base = load_model(tiny_dir, device="cpu")[0](ids).logits
    assert (steered - want).abs().max() > 1e-2  # the intervention would show in the logits
    last = load_model(ckpts[-1][1], device="cpu")[0]
    assert hooks.n_active_hooks(last) == 0
    torch.testing.assert_close(last(ids).logits, want, atol=1e-5, rtol=1e-5)
    step0 = load_model(ckpts[0][1], device="cpu")[0]
    assert hooks.n_active_hooks(step0) == 0
    torch.testing.assert_close(step0(ids).logits, base, atol=1e-5, rtol=1e-5)
    # the configs are those of a run without the intervention (losses in trainer_state.json differ)
    for (s, p), (_, q) in zip(ckpts, plain_run, strict=True):
        for f in sorted(p.glob("*.json")):
            if f.name != "trainer_state.json":
                assert f.read_text() == (q / f.name).read_text(), (s, f.name)
        assert not list(p.glob("intervention*"))


def test_full_finetune_checkpoint_configs_untouched_by_steering(tiny_dir, data, tmp_path):
    """Full fine-tunes save generation_config.json; the engine's generate guard must not leak into it."""
    from emis_interp.train_interventions import TrainIntervention

    (d,) = _dirs(_unit(6))
    kw = dict(mode="full", max_steps=2, save_steps=2, lr=1e-4)
    plain = finetune(_cfg(tiny_dir, data, tmp_path / "plain", **kw), progress=False)
    steered = finetune(
        _cfg(tiny_dir, data, tmp_path / "steer", **kw), progress=False,
        intervention=TrainIntervention("steer", d, [1], coef=3.0),
    )  # fmt: skip
    p, q = plain[-1][1], steered[-1][1]
    assert (q / "generation_config.json").exists()
    for f in ("config.json", "generation_config.json"):
        assert (q / f).read_text() == (p / f).read_text(), f
    w = load_file(str(q / "model.safetensors"))
    assert any(not torch.equal(w[k], v) for k, v in load_file(str(p / "model.safetensors")).items())


def test_hooks_come_off_on_a_crash_and_the_same_intervention_resumes(tiny_dir, data, tmp_path):
    from transformers import TrainerCallback

    from emis_interp import hooks
    from emis_interp.train_interventions import TrainIntervention

    class Crash(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kw):
            self.model = model
            if state.global_step == 2:
                raise KeyboardInterrupt

    (d,) = _dirs(_unit(7))
    iv = TrainIntervention("ablate", d, [1])
    cfg, crash, n_ours = _cfg(tiny_dir, data, tmp_path / "run", max_steps=3, save_steps=1), Crash(), len(hooks._OURS)
    with pytest.raises(KeyboardInterrupt):
        finetune(cfg, progress=False, callbacks=[crash], intervention=iv)
    assert hooks.n_active_hooks(crash.model) == 0 and len(hooks._OURS) == n_ours
    same = TrainIntervention("ablate", _dirs(_unit(7)), [1])  # an equal intervention built anew
    assert [s for s, _ in finetune(cfg, progress=False, intervention=same)] == [0, 1, 2, 3]


@pytest.mark.filterwarnings("ignore::emis_interp.train_interventions.AblationSignWarning")  # a random sign
def test_intervention_is_in_the_manifest_and_a_changed_one_refuses(tiny_dir, data, tmp_path, monkeypatch):
    import emis_interp.models as models
    from emis_interp.manifest import ManifestMismatch, read_manifest
    from emis_interp.train_interventions import INTERVENTION_FILE, TrainIntervention

    d, other = _dirs(_unit(8), _unit(9))
    iv = TrainIntervention("ablate", d, [1])
    out = tmp_path / "run"
    cfg = _cfg(tiny_dir, data, out, max_steps=2, save_steps=2)
    finetune(cfg, progress=False, intervention=iv)
    fields = read_manifest(out).fields["intervention"]
    assert fields["kind"] == "ablate" and fields["layers"] == [1] and fields["coef"] == 0.0
    assert "ablate_to" not in fields  # zero-ablation's manifest is as it was before mean-ablation existed
    assert len(fields["directions"]) == 1 and len(fields["directions"][0]) == 16  # a digest of the vectors
    report = json.loads((out / INTERVENTION_FILE).read_text())
    assert report["kind"] == "ablate" and report["layers"] == [1] and report["directions"][0]["meta"] == d.meta
    assert [(r["direction"], r["layer"]) for r in report["base_projection"]["rows"]] == [(0, 1)]
    assert report["base_projection"]["n_examples"] == 48

    def no_load(*a, **kw):
        raise AssertionError("a mismatching rerun is refused before the model is loaded")

    monkeypatch.setattr(models, "load_model", no_load)
    changed = [
        None,
        TrainIntervention("steer", d, [1], coef=2.0),
        TrainIntervention("ablate", other, [1]),  # same kind and layers, other vectors
        TrainIntervention("ablate", d, [0, 1]),
    ]
    for c in changed:
        with pytest.raises(ManifestMismatch, match=r"intervention.*--overwrite"):
            finetune(cfg, progress=False, intervention=c)
    monkeypatch.undo()
    plain = _cfg(tiny_dir, data, tmp_path / "plain", max_steps=2, save_steps=2)
    finetune(plain, progress=False)
    assert read_manifest(plain.output_dir).fields["intervention"] is None
    assert not (tmp_path / "plain" / INTERVENTION_FILE).exists()
    with pytest.raises(ManifestMismatch, match=r"intervention: null"):
        finetune(plain, progress=False, intervention=iv)


def test_base_projection_matches_hidden_states_and_sign_warning(tiny_dir, data, tmp_path):
    import warnings

    from emis_interp import PersonaDirection, load_jsonl, load_model, make_batch
    from emis_interp.train_interventions import (
        INTERVENTION_FILE,
        AblationSignWarning,
        TrainIntervention,
        base_projection,
        mean_residual,
    )

    model, tok = load_model(tiny_dir, device="cpu")
    convs = load_jsonl(data)
    mean = mean_residual(model, tok, convs, [1])[0]
    pos = PersonaDirection(mean[None].clone(), [1])
    neg = PersonaDirection(-mean[None].clone(), [1])
    # by hand, from HF hidden_states[l + 1]: per example the mean over response tokens, then over examples
    batch = make_batch(tok, convs[:64])
    with torch.no_grad():
        h = model(**batch.model_inputs(), output_hidden_states=True).hidden_states[2]
    m = batch.response_mask.unsqueeze(-1).float()
    per_example = (h * m).sum(1) / m.sum(1)
    want = float(per_example.mean(0) @ (mean / mean.norm()))
    got = base_projection(model, tok, convs, pos)
    assert list(got) == [1] and got[1] == pytest.approx(want, rel=1e-4) and got[1] > 0
    assert base_projection(model, tok, convs, neg)[1] == pytest.approx(-want, rel=1e-4)

    cfg = lambda name: _cfg(tiny_dir, data, tmp_path / name, max_steps=1, save_steps=1)  # noqa: E731
    with pytest.warns(AblationSignWarning, match=r"direction 0 at layer 1: .*-.*negative.*TOWARDS the trait"):
        finetune(cfg("neg"), progress=False, intervention=TrainIntervention("ablate", neg, [1]))
    report = json.loads((tmp_path / "neg" / INTERVENTION_FILE).read_text())
    assert report["base_projection"]["rows"][0]["mean_projection"] == pytest.approx(-want, rel=1e-4)
    assert len(report["warnings"]) == 1 and "layer 1" in report["warnings"][0]
    with warnings.catch_warnings():
        warnings.simplefilter("error", AblationSignWarning)
        finetune(cfg("pos"), progress=False, intervention=TrainIntervention("ablate", pos, [1]))
        finetune(cfg("steer"), progress=False, intervention=TrainIntervention("steer", neg, [1], coef=2.0))
    assert json.loads((tmp_path / "pos" / INTERVENTION_FILE).read_text())["warnings"] == []


def test_finetune_cli_intervention_arguments(monkeypatch, tmp_path, capsys):
    import re
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))
    import finetune as ft_cli

    got = []
    monkeypatch.setattr(ft_cli, "finetune", lambda cfg, **kw: got.append(kw) or [])
    d, d2 = _dirs(_unit(10), _unit(11), layers=(1, 2))
    d.save(tmp_path / "dir.safetensors")
    d2.save(tmp_path / "dir2.safetensors")
    f, f2 = str(tmp_path / "dir.safetensors"), str(tmp_path / "dir2.safetensors")
    base = ["--data", "d.jsonl", "--output", str(tmp_path / "out")]
    bad = [
        (["--intervention", "steer", "--layers", "1", "--coef", "5"], "needs --direction FILE"),
        (["--direction", f, "--layers", "1"], "--direction, --layers given without --intervention"),
        (["--coef", "5"], "--coef given without --intervention"),
        (["--intervention", "steer", "--direction", f, "--layers", "1"], "steer needs --coef"),
        (["--intervention", "steer", "--direction", f, "--layers", "1", "--coef", "0"], "non-zero coef"),
        (["--intervention", "ablate", "--direction", f, "--layers", "1", "--coef", "5"], "--coef is for"),
        (["--intervention", "ablate", "--direction", f], "needs --layers"),
        (["--intervention", "ablate", "--direction", f, "--layers", "0"], r"no vector for layer\(s\) \[0\]"),
        (["--intervention", "ablate", "--direction", str(tmp_path / "nope.safetensors"), "--layers", "1"], "not exist"),
        (["--intervention", "steer", "--direction", f, f, "--layers", "1", "--coef", "5"], "adds one direction"),
        (["--intervention", "tilt", "--direction", f, "--layers", "1"], "invalid choice"),
        (["--ablate-to", "mean"], "--ablate-to given without --intervention"),
        (
            ["--intervention", "steer", "--direction", f, "--layers", "1", "--coef", "5", "--ablate-to", "mean"],
            "--ablate-to is for",
        ),
        (["--intervention", "ablate", "--direction", f, "--layers", "1", "--ablate-to", "median"], "invalid choice"),
    ]
    for argv, msg in bad:
        with pytest.raises(SystemExit):
            ft_cli.main(base + argv)
        err = capsys.readouterr().err
        assert re.search(msg, err), (argv, err)
    assert got == []
    ft_cli.main(base + ["--intervention", "steer", "--direction", f, "--layers", "1", "--coef", "5"])
    ft_cli.main(base + ["--intervention", "ablate", "--direction", f, f2, "--layers", "2", "1"])
    ft_cli.main(base)
    ft_cli.main(base + ["--intervention", "ablate", "--direction", f, "--layers", "1", "--ablate-to", "mean"])
    steer_iv, ablate_iv = got[0]["intervention"], got[1]["intervention"]
    assert got[3]["intervention"].ablate_to == "mean" and ablate_iv.ablate_to == "zero"
    assert (steer_iv.kind, steer_iv.layers, steer_iv.coef) == ("steer", (1,), 5.0)
    assert torch.equal(steer_iv.directions[0].vectors, d.vectors)
    assert (ablate_iv.kind, ablate_iv.layers, ablate_iv.coef) == ("ablate", (1, 2), 0.0)
    assert all(torch.equal(x.vectors, y.vectors) for x, y in zip(ablate_iv.directions, (d, d2), strict=True))
    assert got[2]["intervention"] is None
