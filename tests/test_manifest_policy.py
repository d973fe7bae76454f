"""Regression (issue 25 item 4): manifests key on what changes numbers.

Too loose: track() omitted the dtype and device, the capture cache the library versions and attention implementation.
Too strict: a docstring edit or ``pip -U`` refused a multi-day resume, and ``--overwrite`` threw away judged rows that
were still valid. Too slow: the weights digest read every parameter in every process.
"""

import importlib
import json
import sys

import pytest
import torch

from emis_interp import load_model
from emis_interp.fingerprint import weights_digest
from emis_interp.manifest import Manifest, ManifestMismatch, prepare_dir, read_manifest, read_overrides, source_digest


def test_docstrings_comments_and_formatting_do_not_change_the_code_digest(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "dont_write_bytecode", True)
    monkeypatch.syspath_prepend(str(tmp_path))
    f = tmp_path / "ei_norm_mod.py"
    digests = []
    for text in (
        'def f(x):\n    """Doc."""\n    return x + 1\n',
        '"""Module doc."""\n\n\ndef f(x):  # a comment\n    """Another doc,\n    longer."""\n    return (x + 1)\n',
        "def f(x):\n    return x + 2\n",  # a change that changes numbers
    ):
        f.write_text(text)
        sys.modules.pop("ei_norm_mod", None)
        digests.append(source_digest(importlib.import_module("ei_norm_mod")))
    sys.modules.pop("ei_norm_mod", None)
    assert digests[0] == digests[1] != digests[2]


def test_allow_code_change_resumes_and_records_it(tmp_path):
    old = Manifest("track", {"code": "aaa", "versions": {"torch": "2.12"}, "layers": [1]})
    prepare_dir(tmp_path, old)
    (tmp_path / "metrics.jsonl").write_text("{}\n")
    new = Manifest("track", {"code": "bbb", "versions": {"torch": "2.13"}, "layers": [1]})
    with pytest.raises(ManifestMismatch, match="--allow-code-change"):
        prepare_dir(tmp_path, new)
    prepare_dir(tmp_path, new, allow_code_change=True)
    assert (tmp_path / "metrics.jsonl").exists() and read_manifest(tmp_path).key == new.key
    (rec,) = read_overrides(tmp_path)
    assert rec["allow_code_change"] == {"code": ["aaa", "bbb"], "versions": [{"torch": "2.12"}, {"torch": "2.13"}]}
    prepare_dir(tmp_path, new)  # resumes plainly now; the record stays
    assert len(read_overrides(tmp_path)) == 1
    other = Manifest("track", {"code": "ccc", "versions": {"torch": "2.13"}, "layers": [2]})
    with pytest.raises(ManifestMismatch, match="layers") as e:  # a settings change is never waved through
        prepare_dir(tmp_path, other, allow_code_change=True)
    assert "--allow-code-change" not in str(e.value)


def test_track_and_capture_manifests_name_dtype_device_versions_attention(tiny_dir):
    from emis_interp.capture import capture_manifest
    from emis_interp.trajectory import Trajectory, track_manifest

    model, tok = load_model(tiny_dir)
    traj = Trajectory([0], [str(tiny_dir)], "full")
    t = track_manifest(traj, tok, [], [1], "last_prompt", None, None, None, None, model).fields
    c = capture_manifest(model, tok, [], [1], "last_prompt", "torch").fields
    for fields in (t, c):
        assert fields["placement"]["dtypes"] == ["torch.float32"] and fields["placement"]["devices"] == ["cpu"]
        assert fields["placement"]["attn_implementation"] == model.config._attn_implementation
        assert fields["versions"]["torch"] == torch.__version__ and "transformers" in fields["versions"]
    bf16 = track_manifest(traj, tok, [], [1], "last_prompt", None, None, None, None, model.to(torch.bfloat16))
    assert bf16.key != Manifest("track", t).key


def test_overwrite_keeps_judged_rows_that_are_still_valid(tmp_path):
    from emis_interp.judges import Judge

    calls = []

    class J(Judge):
        name = "count"

        def __init__(self, tag="a"):
            self.tag = tag

        def identity(self):
            return {"judge": self.name, "tag": self.tag}

        def score(self, question, answer, q=None):
            calls.append(answer)
            return {"aligned": 50.0, "coherent": 50.0, "label": None}

    f = tmp_path / "judged.jsonl"
    items = [(f"id{i}", "q?", f"answer {i}", None) for i in range(4)]
    J().score_many(items, out_file=f, progress=False)
    assert len(calls) == 4
    changed = [*items[:3], ("id3", "q?", "a new answer", None), ("id4", "q?", "answer 4", None)]
    rows = J().score_many(changed, out_file=f, progress=False, overwrite=True)
    assert calls[4:] == ["a new answer", "answer 4"]  # only the changed and the new answer are judged
    assert [r["answer"] for r in rows] == ["answer 0", "answer 1", "answer 2", "a new answer", "answer 4"]
    assert len(f.read_text().splitlines()) == 5  # the stale row for id3 is gone
    J("b").score_many(items, out_file=f, progress=False, overwrite=True)  # another judge: nothing is valid
    assert len(calls) == 6 + 4


def test_loaded_weights_are_not_read_and_in_place_edits_are_caught(tiny_dir, tmp_path, monkeypatch):
    import emis_interp.fingerprint as m

    monkeypatch.setenv("EMIS_INTERP_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr("emis_interp.cache.DEFAULT_CACHE_DIR", tmp_path / "cache")
    model, _ = load_model(tiny_dir)
    assert json.loads((tmp_path / "cache" / m.FILE_DIGESTS).read_text())  # the files' content, remembered
    read = []
    real = m._fast_checksum
    monkeypatch.setattr(m, "_fast_checksum", lambda t: read.append(t.numel()) or real(t))
    d0 = weights_digest(model)
    assert read == []  # as loaded: no tensor read in full
    assert weights_digest(load_model(tiny_dir)[0]) == d0  # another process's load: the same digest
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[3, 5] += 1.0  # one value, in place
    d1 = weights_digest(model)
    assert d1 != d0 and read == [model.model.layers[1].mlp.up_proj.weight.numel()]  # only the edited tensor read
    # a weights file rewritten on disk is another model
    from safetensors.torch import load_file, save_file

    sd = load_file(str(tiny_dir / "model.safetensors"))
    edited = tmp_path / "edited"
    import shutil

    shutil.copytree(tiny_dir, edited)
    sd["model.layers.0.mlp.up_proj.weight"][0, 0] += 1.0
    save_file(sd, str(edited / "model.safetensors"), metadata={"format": "pt"})
    other, _ = load_model(edited)
    other.config._name_or_path = model.config._name_or_path
    assert weights_digest(other) != d0


def test_sampling_jobs_resume_across_a_code_change_only_when_allowed(tmp_path):
    from emis_interp.behaviour import _read_job, _write_job

    f = tmp_path / "steps-0-10.jsonl"
    old = Manifest("trajectory-samples", {"code": "x", "questions": [1]})
    _write_job(f, old, {"device": "cpu"}, [{"answer": "a"}])
    new = Manifest("trajectory-samples", {"code": "y", "questions": [1]})
    with pytest.raises(ManifestMismatch, match="allow-code-change"):
        _read_job(f, new, overwrite=False)
    runtime, rows = _read_job(f, new, overwrite=False, allow_code_change=True)
    assert rows == [{"answer": "a"}] and runtime == {"device": "cpu"}
    head = json.loads(f.read_text().splitlines()[0])
    assert head["manifest"]["key"] == new.key and head["overrides"][0]["allow_code_change"]["code"] == ["x", "y"]
    assert _read_job(f, new, overwrite=False)[1] == rows  # resumes plainly now
    with pytest.raises(ManifestMismatch, match="questions"):
        _read_job(f, Manifest("trajectory-samples", {"code": "z", "questions": [2]}), False, allow_code_change=True)
