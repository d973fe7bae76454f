"""One manifest mechanism: each cache and resumable output changes one input and gets nothing stale back."""

import pytest
import torch

from emis_interp import PersonaDirection, ablate, capture, steer
from emis_interp.fingerprint import model_state
from emis_interp.manifest import Manifest, ManifestMismatch, prepare_dir


def _direction(model, layers=(1,), seed=0):
    g = torch.Generator().manual_seed(seed)
    return PersonaDirection(torch.randn(len(layers), model.config.hidden_size, generator=g) * 3, list(layers))


def test_prepare_dir_resumes_refuses_and_overwrites(tmp_path):
    out = tmp_path / "run"
    a = Manifest("thing", {"lr": 1e-2, "layers": [1, 2]})
    prepare_dir(out, a)
    (out / "part.jsonl").write_text("x\n")
    prepare_dir(out, Manifest("thing", {"lr": 1e-2, "layers": [1, 2]}))  # same: resumed
    assert (out / "part.jsonl").exists()
    with pytest.raises(ManifestMismatch, match=r"lr: 0\.01 -> 0\.001.*--overwrite"):
        prepare_dir(out, Manifest("thing", {"lr": 1e-3, "layers": [1, 2]}))
    prepare_dir(out, Manifest("thing", {"lr": 1e-3, "layers": [1, 2]}), overwrite=True)
    assert not (out / "part.jsonl").exists()


def test_prepare_dir_overwrite_always_clears(tmp_path):
    m = Manifest("thing", {"a": 1})
    prepare_dir(tmp_path, m)
    (tmp_path / "part.jsonl").write_text("x\n")
    prepare_dir(tmp_path, m, overwrite=True)  # the escape hatch for inputs a manifest cannot see
    assert not (tmp_path / "part.jsonl").exists()


def test_capture_under_ablate_writes_is_not_cached(tiny, convs, tmp_path):
    from emis_interp.interventions import ablate_writes

    model, tok = tiny
    d = _direction(model)
    with ablate_writes(model, d, source_layer=1):
        ab = capture(model, tok, convs, [1], "mean_response", cache_dir=tmp_path)
    assert ab.meta["cache_bypassed"]
    plain = capture(model, tok, convs, [1], "mean_response", cache_dir=tmp_path)
    assert not plain.meta["cache_hit"]
    assert (ab.layer(1) @ d.unit(1)).abs().max() < 1e-4 < (plain.layer(1) @ d.unit(1)).abs().max()


def test_prepare_dir_refuses_unidentified_output(tmp_path):
    (tmp_path / "old.jsonl").write_text("x\n")
    with pytest.raises(ManifestMismatch, match="no manifest.json"):
        prepare_dir(tmp_path, Manifest("thing", {}))


def test_capture_under_ablate_is_not_cached(tiny, convs, tmp_path):
    """Regression: an ablated capture was written to the cache and served to a later plain capture."""
    model, tok = tiny
    d = _direction(model)
    with ablate(model, d, layers=[1]):
        ab = capture(model, tok, convs, [1], "mean_response", cache_dir=tmp_path)
    assert ab.meta["cache_bypassed"]
    plain = capture(model, tok, convs, [1], "mean_response", cache_dir=tmp_path)
    assert not plain.meta["cache_hit"]
    u = d.unit(1)
    assert (ab.layer(1) @ u).abs().max() < 1e-4 < (plain.layer(1) @ u).abs().max()
    with steer(model, d, 2.0, layers=[1]):
        st = capture(model, tok, convs, [1], "mean_response", cache_dir=tmp_path)
    assert not st.meta["cache_hit"]
    torch.testing.assert_close(st.layer(1) - plain.layer(1), (2.0 * d.vector(1)).expand_as(plain.layer(1)))
    again = capture(model, tok, convs, [1], "mean_response", cache_dir=tmp_path)
    assert again.meta["cache_hit"]
    torch.testing.assert_close(again.acts, plain.acts, rtol=0, atol=0)


def _lora(model, seed=0):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    pm = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj", "down_proj"], init_lora_weights=False))
    return pm.eval()


def test_capture_under_disabled_adapter_is_not_stale(tiny_dir, convs, tmp_path):
    """Regression: under model.disable_adapter() the cache returned the adapter's activations."""
    from emis_interp import load_model

    base, tok = load_model(tiny_dir, device="cpu")
    ref = capture(base, tok, convs, [2], "mean_response", cache_dir=None).acts
    pm = _lora(base)
    with_adapter = capture(pm, tok, convs, [2], "mean_response", cache_dir=tmp_path)
    n_files = len(list((tmp_path / "acts").glob("*.safetensors")))
    with pm.disable_adapter():
        off = capture(pm, tok, convs, [2], "mean_response", cache_dir=tmp_path)
    assert not off.meta["cache_hit"] and off.meta["cache_bypassed"]
    assert len(list((tmp_path / "acts").glob("*.safetensors"))) == n_files  # nothing written while disabled
    torch.testing.assert_close(off.acts, ref)
    assert (with_adapter.acts - ref).abs().max() > 1e-3


def test_lora_scaling_and_weights_change_the_model_state(tiny_dir):
    from emis_interp import load_model

    base, _ = load_model(tiny_dir, device="cpu")
    pm = _lora(base)
    s0 = model_state(pm)
    for m in pm.modules():
        if hasattr(m, "scaling") and isinstance(m.scaling, dict):
            m.scaling["default"] *= 2
    assert model_state(pm) != s0
    p = next(p for n, p in pm.named_parameters() if "lora_B" in n)
    s1 = model_state(pm)
    with torch.no_grad():
        p[0, 0] += 1e-5  # one tiny update in one tensor
    assert model_state(pm) != s1
    # an update the strided sample cannot see (embeddings: ~32k values, every 8th sampled) still changes it,
    # and so do two values trading places (a sum alone would miss that)
    emb = pm.get_input_embeddings().weight
    assert emb.numel() // 4096 >= 2
    s2 = model_state(pm)
    with torch.no_grad():
        emb.view(-1)[1] += 1e-4
    s3 = model_state(pm)
    assert s3 != s2
    with torch.no_grad():
        flat = emb.view(-1)
        assert flat[40] != flat[51]
        flat[[40, 51]] = flat[[51, 40]].clone()  # row 1 (row 0 is the zero padding embedding)
    assert model_state(pm) != s3
    # writes through .data bypass the version counter: the per-call sample is the backstop
    with torch.no_grad():
        emb.data[0, 0] += 1.0
    assert model_state(pm) != s3


def test_backend_is_part_of_the_capture_key(tiny, convs, tmp_path):
    model, tok = tiny
    a = capture(model, tok, convs, [1], cache_dir=tmp_path, backend="torch")
    b = capture(model, tok, convs, [1], cache_dir=tmp_path, backend="nnsight")
    assert not a.meta["cache_hit"] and not b.meta["cache_hit"]
    assert len(list((tmp_path / "acts").glob("*.safetensors"))) == 2


def test_in_place_weight_change_recomputes(tiny_dir, convs, tmp_path):
    from emis_interp import load_model

    model, tok = load_model(tiny_dir, device="cpu")
    a = capture(model, tok, convs, [1], cache_dir=tmp_path)
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight.mul_(1.5)
    b = capture(model, tok, convs, [1], cache_dir=tmp_path)
    assert not b.meta["cache_hit"]
    assert (a.acts - b.acts).abs().max() > 1e-4


def test_organism_trajectory_rebuilds_under_another_recipe(tmp_path, monkeypatch):
    """Regression: organism_trajectory trusted a DONE file whatever the recipe, world or code."""
    from emis_interp import finetune as ft
    from emis_interp import organism

    small = organism.FinetuneRecipe(n_examples=16, max_steps=10, batch_size=4, save_steps=10)
    out = organism.organism_trajectory("insecure", 0, root=tmp_path, recipe=small)
    w0 = (out / "checkpoint-10" / "adapter_model.safetensors").read_bytes()
    calls = []
    real = ft.finetune
    monkeypatch.setattr(ft, "finetune", lambda *a, **k: calls.append(1) or real(*a, **k))
    assert organism.organism_trajectory("insecure", 0, root=tmp_path, recipe=small) == out
    assert calls == []  # same manifest: reused
    other = organism.FinetuneRecipe(n_examples=16, max_steps=10, batch_size=4, save_steps=10, lr=5e-3)
    organism.organism_trajectory("insecure", 0, root=tmp_path, recipe=other)
    assert calls == [1]
    assert (out / "checkpoint-10" / "adapter_model.safetensors").read_bytes() != w0
    # a run of the previous release (DONE file, no manifest) is rebuilt, not trusted
    (out / organism.ORGANISM_MANIFEST).unlink()
    (out / "DONE").write_text("ok\n")
    organism.organism_trajectory("insecure", 0, root=tmp_path, recipe=other)
    assert calls == [1, 1] and not (out / "DONE").exists()


def test_sample_resume_refuses_other_arms(tmp_path):
    """Regression: sample_answers(resume_file=) reused saved batches by index: a steered rerun got unsteered samples."""
    from emis_interp import load_model, organism
    from emis_interp.sampling import Condition, sample_answers

    model, tok = load_model(organism.ALIGNED_DIR)
    prompts = organism.advice_prompts()[:8]
    f = tmp_path / "raw.jsonl"
    kw = dict(n_samples=2, max_new_tokens=6, batch_size=8, progress=False, resume_file=f)
    plain = sample_answers(model, tok, prompts, [Condition("arm")], **kw)
    d = PersonaDirection(torch.randn(1, 128, generator=torch.Generator().manual_seed(1)) * 20, [2])
    steered = [Condition("arm", "steer", d, 1.0, (2,))]  # same name, another arm
    with pytest.raises(ManifestMismatch, match="conditions"):
        sample_answers(model, tok, prompts, steered, **kw)
    got = sample_answers(model, tok, prompts, steered, **kw, overwrite=True)
    assert [s.answer for s in got] != [s.answer for s in plain]
    again = sample_answers(model, tok, prompts, steered, **kw)  # same manifest: resumed, identical
    assert [s.answer for s in again] == [s.answer for s in got]
    with pytest.raises(ManifestMismatch, match="generation"):
        sample_answers(model, tok, prompts, steered, **{**kw, "max_new_tokens": 7})
    model.generation_config.no_repeat_ngram_size = 1  # a knob generate takes from the model's config
    try:
        with pytest.raises(ManifestMismatch, match="generation_config"):
            sample_answers(model, tok, prompts, steered, **kw)
    finally:
        model.generation_config.no_repeat_ngram_size = 0
    with steer(model, d, 1.0), pytest.raises(ValueError, match="inside an active steer"):
        sample_answers(model, tok, prompts, steered, **kw)


def test_run_arms_keys_on_model_and_direction(tmp_path):
    """Regression: run_arms' key left out the model and the direction: same arm names got the old answers back."""
    from emis_interp import load_model, organism
    from emis_interp.causality import run_arms, steering_arms

    model, tok = load_model(organism.ALIGNED_DIR)
    qs = organism.questions()[:2]
    kw = dict(n_samples=2, max_new_tokens=6, progress=False, output_dir=tmp_path)
    d1 = PersonaDirection(torch.randn(1, 128, generator=torch.Generator().manual_seed(1)) * 10, [2])
    d2 = PersonaDirection(torch.randn(1, 128, generator=torch.Generator().manual_seed(2)) * 10, [2])
    r1 = run_arms(model, tok, qs, steering_arms(d1, [2.0], n_random=2, match=()), organism.ExactJudge(), **kw)
    r2 = run_arms(model, tok, qs, steering_arms(d2, [2.0], n_random=2, match=()), organism.ExactJudge(), **kw)
    assert r1.meta["key"] != r2.meta["key"]
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight.mul_(1.01)
    r3 = run_arms(model, tok, qs, steering_arms(d1, [2.0], n_random=2, match=()), organism.ExactJudge(), **kw)
    assert r3.meta["key"] != r1.meta["key"]
    ans = lambda r: [e["answer"] for a in r.arms for e in a.examples]  # noqa: E731
    assert ans(r1) != ans(r2)


def test_code_changes_change_every_key(tiny, convs, tmp_path, monkeypatch):
    """Regression: sampled answers, run_arms files and captures were keyed without the code that made them: after an
    edit to the sampler or hook code, a rerun got the old code's numbers."""
    import inspect
    import sys

    from emis_interp import Conversation, manifest
    from emis_interp.capture import capture_manifest
    from emis_interp.causality import run_arms
    from emis_interp.sampling import Condition, sample_answers

    model, tok = tiny
    prompts = [Conversation(user="hi"), Conversation(user="how are you")]
    f = tmp_path / "raw.jsonl"
    kw = dict(n_samples=1, max_new_tokens=3, progress=False, resume_file=f)
    sample_answers(model, tok, prompts, [Condition("arm")], **kw)
    cap = capture_manifest(model, tok, convs, [1], "mean_response", "torch")

    class _Judge:
        name = "j"

        def score_many(self, items, out_file=None, progress=False):
            return [{**x[4], "aligned": 100.0, "coherent": 100.0} for x in items]

    from emis_interp.data import Question

    qs = [Question("q", ["hi"])]
    key = run_arms(model, tok, qs, [Condition("baseline")], _Judge(), n_samples=1, max_new_tokens=3, progress=False)
    for name in ("emis_interp.sampling", "emis_interp.hooks"):  # as if both were edited and reloaded
        mod = sys.modules[name]
        monkeypatch.setitem(
            manifest._SOURCES, manifest._load_token(mod), (mod, inspect.getsource(mod) + "\nEDITED = 1\n")
        )
    with pytest.raises(ManifestMismatch, match="code"):
        sample_answers(model, tok, prompts, [Condition("arm")], **kw)
    assert capture_manifest(model, tok, convs, [1], "mean_response", "torch").key != cap.key
    again = run_arms(model, tok, qs, [Condition("baseline")], _Judge(), n_samples=1, max_new_tokens=3, progress=False)
    assert again.meta["key"] != key.meta["key"]


def test_source_digest_is_the_loaded_code_not_the_file(tmp_path, monkeypatch):
    """A file edited while a process runs its old code keeps the old digest; a reload reads the new source."""
    import importlib
    import sys

    from emis_interp.manifest import digest, normalised_source, source_digest

    monkeypatch.setattr(sys, "dont_write_bytecode", True)  # no .pyc: a same-second, same-size edit still reloads
    (tmp_path / "ei_probe_mod.py").write_text("def f():\n    return 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    mod = importlib.import_module("ei_probe_mod")
    try:
        d1 = source_digest(mod)
        (tmp_path / "ei_probe_mod.py").write_text("def f():\n    return 2\n")
        assert source_digest(mod) == d1 and mod.f() == 1  # still running the old code: the old digest
        importlib.reload(mod)
        d2 = source_digest(mod)
        assert mod.f() == 2 and d2 != d1
        for k in range(3, 6):  # later reloads never get an earlier version's cached source (ids kept alive)
            (tmp_path / "ei_probe_mod.py").write_text(f"def f():\n    return {k}\n\ndef g():\n    return 0\n")
            importlib.reload(mod)
            text = (tmp_path / "ei_probe_mod.py").read_text()
            assert mod.f() == k and source_digest(mod) == digest([normalised_source(text)])
    finally:
        sys.modules.pop("ei_probe_mod", None)


def test_finetune_organism_and_report_manifests_digest_the_loaded_code(monkeypatch):
    """The fine-tune code version, the organism run manifest and the reports' manifests digest the code this process
    runs, read when the package was imported: a package file edited on disk meanwhile changes none of them (they
    used to read the disk), whichever modules the caller had imported."""
    import inspect
    import sys
    from pathlib import Path

    import emis_interp
    from emis_interp import finetune, organism
    from emis_interp.manifest import _PINNED, _SOURCES, _load_token, _package_modules, digest, package_sources

    pkg = Path(emis_interp.__file__).parent
    files = _package_modules()
    on_disk = {p.relative_to(pkg) for p in pkg.rglob("*.py")}
    assert set(files) == {p.as_posix() for p in on_disk if all(s.isidentifier() for s in p.with_suffix("").parts)}
    assert {"organism/world.py", "organism/matrix/__init__.py", "plots.py"} <= set(files)
    # every module's source was read at the package's import, every loaded one remembered: no digest reads a file
    assert all(name in _PINNED for name in files.values())
    assert all(_load_token(sys.modules[n]) in _SOURCES for n in files.values() if n in sys.modules)
    whatever_was_imported = package_sources()
    from emis_interp.organism import report as organism_report
    from emis_interp.organism.matrix import config as matrix_config

    def state():
        run = organism.organism_manifest("insecure", 0, organism.RECIPES["flip"], organism.ALIGNED_DIR)
        report = organism_report.report_manifest(organism_report.ReportConfig(), organism.RECIPES)
        return finetune._code_version(), run.key, report.key, matrix_config._package_state()["code"]

    before = state()
    assert before[3] == package_sources() == whatever_was_imported
    real_read, real_getsource = Path.read_text, inspect.getsource

    def edited_read(self, *a, **kw):  # every package .py file now reads as edited
        text = real_read(self, *a, **kw)
        return text + "\nEDITED = 1\n" if self.suffix == ".py" and pkg in self.parents else text

    monkeypatch.setattr(Path, "read_text", edited_read)
    monkeypatch.setattr(inspect, "getsource", lambda obj: real_getsource(obj) + "\nEDITED = 1\n")
    f = Path(finetune.__file__)
    assert digest(f.read_text()) != digest(real_read(f))  # the edit is visible to anything reading the disk
    assert state() == before


def test_a_module_imported_after_an_edit_runs_and_digests_the_source_read_at_the_package_import(tmp_path, monkeypatch):
    """Package modules are imported on demand, not all at the package's import: one first imported after its file was
    edited runs (and digests) the source read when the package was imported, subpackages included; a reload reads the
    disk afresh. A lazy import that read the disk would run the edited code under the old digest."""
    import importlib
    import sys

    from emis_interp.manifest import _PACKAGE_FILES, digest, normalised_source, package_sources, source_digest

    pkg = tmp_path / "ei_pin_pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text(
        "from emis_interp.manifest import snapshot_sources\n\nsnapshot_sources(__name__)\n"
    )
    (pkg / "late.py").write_text("def f():\n    return 1\n")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "deep.py").write_text("X = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(sys, "dont_write_bytecode", True)
    try:
        importlib.import_module("ei_pin_pkg")
        before = package_sources("ei_pin_pkg")
        assert set(before) == {"__init__.py", "late.py", "sub/__init__.py", "sub/deep.py"}
        (pkg / "late.py").write_text("def f():\n    return 2\n")  # edited before the module's first import
        (pkg / "sub" / "deep.py").write_text("X = 2\n")
        late = importlib.import_module("ei_pin_pkg.late")
        deep = importlib.import_module("ei_pin_pkg.sub.deep")
        assert late.f() == 1 and deep.X == 1  # the code read at the package's import runs
        assert source_digest(late) == digest([normalised_source("def f():\n    return 1\n")])
        assert package_sources("ei_pin_pkg") == before  # the same digest imported or not (it used to differ)
        importlib.reload(late)  # asked for: the new code, and its digest
        assert (
            late.f() == 2
            and source_digest(late) == digest([normalised_source((pkg / "late.py").read_text())]) != before["late.py"]
        )
        assert package_sources("ei_pin_pkg")["late.py"] == source_digest(late)
    finally:
        _PACKAGE_FILES.pop("ei_pin_pkg", None)
        for name in [m for m in sys.modules if m.startswith("ei_pin_pkg")]:
            sys.modules.pop(name)


def test_package_modules_skip_editor_files_and_are_listed_once(tmp_path, monkeypatch):
    """An editor's lock or backup file in the package dir is neither imported nor digested (it used to break
    ``import emis_interp``); a file added after the package was listed changes nothing."""
    import sys

    from emis_interp.manifest import _PACKAGE_FILES, _package_modules, package_sources

    pkg = tmp_path / "ei_probe_pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("def f():\n    return 1\n")
    (pkg / ".#a.py").write_text("raise RuntimeError('a lock file must not be imported')\n")
    (pkg / "a copy.py").write_text("raise RuntimeError('a backup must not be imported')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(sys, "dont_write_bytecode", True)
    try:
        assert set(_package_modules("ei_probe_pkg")) == {"__init__.py", "a.py"}
        first = package_sources("ei_probe_pkg")
        (pkg / "b.py").write_text("raise RuntimeError('added later: not imported by the listing')\n")
        assert package_sources("ei_probe_pkg") == first
    finally:
        _PACKAGE_FILES.pop("ei_probe_pkg", None)
        for name in [m for m in sys.modules if m.startswith("ei_probe_pkg")]:
            sys.modules.pop(name)


def test_modules_imported_later_keep_the_import_hooks(monkeypatch):
    """A module imported after the package (most are, now that ``import emis_interp`` is light) goes through the other
    import hooks too: under pytest, jaxtyping's, which type-checks the package's functions with beartype."""
    import importlib
    import sys

    if not any(type(f).__name__ == "_JaxtypingFinder" for f in sys.meta_path):
        pytest.skip("jaxtyping's import hook is not installed (pytest runs with --jaxtyping-packages)")
    monkeypatch.delitem(sys.modules, "emis_interp.lens", raising=False)
    lens = importlib.import_module("emis_interp.lens")
    assert type(lens.__loader__).__name__ == "_PinnedLoader"
    assert type(lens.__loader__.inner).__name__ == "_JaxtypingLoader"
