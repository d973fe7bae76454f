"""experiments/finetune.py --allow-code-change: a fine-tune resumes across a code / library change only with the
flag, the override recorded in its manifest.json; a settings change is never waved through."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from emis_interp.manifest import ManifestMismatch, read_manifest, read_overrides
from emis_interp.organism import world

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))


def test_finetune_cli_resumes_across_a_code_change_only_with_the_flag(tiny_dir, tmp_path, monkeypatch):
    import finetune as ft_cli

    import emis_interp.finetune as ft

    data = tmp_path / "train.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in world.finetune_dataset("insecure", 16, seed=0)))
    out = tmp_path / "run"
    argv = ["--model", str(tiny_dir), "--data", str(data), "--output", str(out), "--max-steps", "4",
            "--save-steps", "2", "--lr", "5e-3", "--lora-r", "1", "--batch-size", "4", "--grad-accum", "1"]  # fmt: skip
    ft_cli.main(argv)
    adapter = out / "checkpoint-4" / "adapter_model.safetensors"
    before = load_file(str(adapter))
    old_code = read_manifest(out).fields["code"]

    monkeypatch.setattr(ft, "_code_version", lambda: "edited-code")  # what a code edit in the fine-tune does
    with pytest.raises(ManifestMismatch, match="--allow-code-change"):
        ft_cli.main(argv)
    assert read_overrides(out) == [] and read_manifest(out).fields["code"] == old_code  # the refusal changed nothing

    with pytest.raises(ManifestMismatch, match="lr"):  # a settings change is refused even with the flag
        ft_cli.main([{"5e-3": "1e-3"}.get(x, x) for x in argv] + ["--allow-code-change"])
    assert read_overrides(out) == []

    ft_cli.main([*argv, "--allow-code-change"])
    (rec,) = read_overrides(out)
    assert rec["allow_code_change"] == {"code": [old_code, "edited-code"]}
    assert read_manifest(out).fields["code"] == "edited-code"
    after = load_file(str(adapter))  # resumed (nothing left to train), not retrained
    assert before.keys() == after.keys() and all((before[k] == after[k]).all() for k in before)
    ft_cli.main(argv)  # a plain rerun now matches; the record stays
    assert len(read_overrides(out)) == 1


@pytest.mark.parametrize(
    "name",
    [
        "emis_interp.finetune",
        "emis_interp.train_interventions",
        "emis_interp.conversations",
        "emis_interp.interventions",
        "emis_interp.hooks",
    ],
)
def test_fine_tune_code_version_digests_every_module_that_determines_the_training(name, monkeypatch):
    """A code edit in any module the training runs (the train-time interventions, split out of finetune, included)
    changes ``_code_version``, so the edited code never resumes the old code's checkpoints."""
    import importlib
    import inspect

    from emis_interp import finetune, manifest

    before = finetune._code_version()
    mod = importlib.import_module(name)
    monkeypatch.setitem(manifest._SOURCES, manifest._load_token(mod), (mod, inspect.getsource(mod) + "\nEDITED = 1\n"))
    assert finetune._code_version() != before
