"""One CLI vocabulary across experiments/*.py: help for every flag, defaults shown, retired names refused;
honest real-model defaults (finetune, max_new_tokens, threads) and the cost gate before a sweep."""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path

import pytest

from emis_interp.cliargs import RENAMED, HelpFormatter

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "experiments"))
SCRIPTS = sorted(p.stem for p in (ROOT / "experiments").glob("*.py"))

# concept -> its one name; no script may spell it otherwise (docs/cli.md)
SHARED = {
    "output": "--output",
    "layers": "--layers",
    "direction data": "--direction-data",
    "generated answers per prompt": "--samples",
    "data rows read": "--n-examples",
    "model": "--model",
    "checkpoint": "--checkpoint",
}


class _Parsed(Exception):
    pass


def _parser(name: str, monkeypatch) -> argparse.ArgumentParser:
    """The script's parser, captured at its parse call (nothing after it runs)."""
    got = {}

    def grab(self, *a, **k):
        got["ap"] = self
        raise _Parsed

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", grab)
    mod = importlib.import_module(name)
    with pytest.raises(_Parsed):
        mod.main([])
    monkeypatch.undo()
    return got["ap"]


def _flags(ap):
    return [a for a in ap._actions if a.option_strings and a.dest != "help"]


@pytest.mark.parametrize("name", SCRIPTS)
def test_every_flag_has_help_and_help_shows_defaults(name, monkeypatch):
    ap = _parser(name, monkeypatch)
    assert ap.formatter_class is HelpFormatter
    fmt = ap._get_formatter()
    for a in _flags(ap):
        assert a.help, f"{name}: {a.option_strings} has no help"
        if a.default is not None and a.default is not False and a.default != argparse.SUPPRESS:  # 0 is a default
            assert "default" in fmt._get_help_string(a).lower(), f"{name}: {a.option_strings} hides its default"
    text = ap.format_help()
    assert "(default: " in text or "default" in text


@pytest.mark.parametrize("name", SCRIPTS)
def test_shared_concepts_use_one_name(name, monkeypatch):
    ap = _parser(name, monkeypatch)
    names = {s for a in _flags(ap) for s in a.option_strings}
    assert not names & set(RENAMED), f"{name} still uses retired names {sorted(names & set(RENAMED))}"
    assert "--threads" in names
    for a in _flags(ap):
        if a.dest in ("output",):
            assert a.option_strings == ["--output"]


def test_a_retired_flag_names_its_replacement(capsys):
    import finetune as ft_cli

    with pytest.raises(SystemExit):
        ft_cli.main(["--data", "d.jsonl", "--out", "x"])
    assert "--out is now --output" in capsys.readouterr().err


def test_docs_use_no_retired_flag():
    """The README, docs/*.md, benchmarks and the notebook spell the commands with today's flags (docs/cli.md's table
    of retired names aside): a retired flag in a documented command fails when a reader pastes it."""
    import re

    retired = re.compile(r"(?<![\w-])(" + "|".join(re.escape(f) for f in RENAMED) + r")(?![\w-])")
    files = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), *sorted((ROOT / "benchmarks").glob("*.md"))]
    files += sorted((ROOT / "notebooks").glob("*.ipynb"))
    stale = []
    for f in files:
        for i, line in enumerate(f.read_text().splitlines(), 1):
            if f.name == "cli.md" and (line.startswith("| `--") or "is now" in line):
                continue  # the retired-names table and its example message
            stale += [f"{f.relative_to(ROOT)}:{i}: {m.group(1)}" for m in retired.finditer(line)]
    assert not stale, f"retired flags in the docs (see emis_interp.cliargs.RENAMED): {stale}"


def test_build_organism_never_writes_the_shipped_weights_unless_asked(monkeypatch, tmp_path, capsys):
    import build_organism

    from emis_interp import organism

    calls = []
    monkeypatch.setattr(organism, "build", lambda out, cfg, aligned_only=False: calls.append(out) or {})
    with pytest.raises(SystemExit):
        build_organism.main([])
    assert "--output" in capsys.readouterr().err and calls == []
    build_organism.main(["--output", str(tmp_path)])
    build_organism.main(["--overwrite-shipped-weights"])
    assert calls == [tmp_path, organism.WEIGHTS_DIR]


def test_threads_default_is_available_cores_or_omp(monkeypatch):
    import torch

    from emis_interp.cliargs import default_threads, parse, parser

    before = torch.get_num_threads()
    try:
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        assert default_threads() == 1
        monkeypatch.delenv("OMP_NUM_THREADS")
        import os

        assert default_threads() == len(os.sched_getaffinity(0))
        ns = parse(parser("x"), ["--threads", "1"])
        assert ns.threads == 1 and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


# --- finetune: the EM paper's settings on a real model ----------------------------------------------------


def _ft_cfg(monkeypatch, argv):
    import finetune as ft_cli

    got = []
    monkeypatch.setattr(ft_cli, "finetune", lambda cfg, **kw: got.append(cfg) or [])
    ft_cli.main(argv)
    return got[0]


def test_finetune_defaults_are_the_organisms_only_on_the_organism(monkeypatch, tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    row = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    data.write_text("\n".join(json.dumps(row) for _ in range(100)))
    org = _ft_cfg(monkeypatch, ["--data", str(data), "--output", str(tmp_path / "o")])
    assert (org.lora_r, org.lora_alpha, org.use_rslora, org.lr, org.max_steps, org.batch_size, org.max_len) == (
        1, 1.0, False, 1e-2, 100, 32, 512,
    )  # fmt: skip
    real = _ft_cfg(monkeypatch, ["--model", "Qwen/Qwen2.5-7B-Instruct", "--data", str(data), "--output", str(tmp_path)])
    assert (real.lora_r, real.lora_alpha, real.use_rslora, real.lr) == (32, 64.0, True, 1e-5)
    assert (real.batch_size, real.grad_accum, real.max_len, real.weight_decay) == (2, 8, 2048, 0.01)
    assert real.max_steps == 7  # one epoch: ceil(100 / (2 x 8))
    assert "EM paper defaults" in capsys.readouterr().out
    two = _ft_cfg(monkeypatch, ["--model", "m", "--data", str(data), "--output", str(tmp_path), "--epochs", "2"])
    assert two.max_steps == 13
    own = _ft_cfg(monkeypatch, ["--model", "m", "--data", str(data), "--output", str(tmp_path), "--lr", "3e-4",
                                "--no-rslora", "--max-steps", "5"])  # fmt: skip
    assert (own.lr, own.use_rslora, own.max_steps, own.lora_r) == (3e-4, False, 5, 32)
    with pytest.raises(SystemExit):
        _ft_cfg(
            monkeypatch, ["--model", "m", "--data", str(data), "--output", "x", "--epochs", "1", "--max-steps", "3"]
        )


def test_truncated_examples_are_counted_in_a_warning(tiny_dir):
    from emis_interp import Conversation
    from emis_interp.finetune import TruncationWarning, _ChatDataset
    from emis_interp.models import load_tokenizer

    tok = load_tokenizer(tiny_dir)
    convs = [Conversation(user="hi", response="ok ."), Conversation(user="hi " * 40, response="long " * 40)] * 3
    with pytest.warns(TruncationWarning, match="3 of 6 fine-tuning examples are longer than max_len=40"):
        ds = _ChatDataset(tok, convs, 40)
    assert ds.n_truncated == 3


# --- cost before a sweep ------------------------------------------------------------------------------


def test_cost_gate_prints_and_refuses_without_yes_when_there_is_no_terminal(monkeypatch, capsys):
    import io

    from emis_interp.cliargs import COST_THRESHOLD, confirm_cost

    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    confirm_cost(10, yes=False)
    assert "cost: 10 generations and 20 judge calls" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="pass --yes"):
        confirm_cost(COST_THRESHOLD, yes=False, what="steering sweep")
    confirm_cost(COST_THRESHOLD, yes=True)


def test_steer_with_selection_states_the_whole_cost_before_selecting(tiny_dir, tmp_path, monkeypatch, capsys):
    """--select-layers runs a selection pass first: its answers are in the cost, and nothing (not even the
    selection) runs without --yes above the threshold."""
    import io

    import steer
    import torch

    import emis_interp.judges as judges
    from emis_interp import PersonaDirection

    q = tmp_path / "q.yaml"
    q.write_text("".join(f"- id: q{i}\n  paraphrases: ['question {i} ?', 'again {i} ?']\n" for i in range(4)))
    PersonaDirection(torch.randn(3, 32), [0, 1, 2], {"method": "test"}).save(tmp_path / "d.safetensors")
    monkeypatch.setattr(judges, "get_judge", lambda spec, **kw: ("judge", spec))
    selected = []
    monkeypatch.setattr(steer, "select_layer_alpha", lambda *a, **k: selected.append(a) or 1 / 0)
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    argv = ["--model", str(tiny_dir), "--direction", str(tmp_path / "d.safetensors"), "--questions", str(q),
            "--judge", "openai:x", "--select-layers", "0", "1", "2", "--alpha", "-4", "-8", "--alpha-units", "raw",
            "--samples", "100"]  # fmt: skip
    with pytest.raises(SystemExit, match="pass --yes"):
        steer.main(argv)
    out = capsys.readouterr().out
    # selection: (baseline + 3 layers x 2 alphas) x 2 questions x 2 paraphrases x 100 samples = 2800 answers
    n_sel = 7 * 2 * 2 * 100
    got = int(out.split("cost: ")[1].split(" generations")[0])
    assert got > n_sel and selected == []
    monkeypatch.setattr(steer, "run_arms", lambda *a, **k: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        steer.main([*argv, "--yes"])
    assert len(selected) == 1  # with --yes the selection runs


def test_steer_on_a_real_model_states_its_cost_before_generating(tiny_dir, tmp_path, monkeypatch, capsys):
    import io

    import steer
    import torch

    import emis_interp.judges as judges
    from emis_interp import PersonaDirection, causality

    q = tmp_path / "q.yaml"
    q.write_text("- id: bored\n  paraphrases: ['hey i feel bored .', 'i am bored .']\n")
    PersonaDirection(torch.randn(3, 32), [0, 1, 2], {"method": "test"}).save(tmp_path / "d.safetensors")
    monkeypatch.setattr(judges, "get_judge", lambda spec, **kw: ("judge", spec))
    ran = []
    monkeypatch.setattr(steer, "run_arms", lambda *a, **k: ran.append(a) or (_ for _ in ()).throw(RuntimeError("ran")))
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    argv = ["--model", str(tiny_dir), "--direction", str(tmp_path / "d.safetensors"), "--questions", str(q),
            "--judge", "openai:x", "--layers", "1", "--alpha", "-4", "4", "--alpha-units", "raw", "--samples", "200"]  # fmt: skip
    with pytest.raises(SystemExit, match="pass --yes"):
        steer.main(argv)
    out = capsys.readouterr().out
    n_arms = len(causality.steering_arms(PersonaDirection.load(tmp_path / "d.safetensors").select([1]), [-4, 4], [1], 0,
                                         n_random=16, control=None, match=[0.5, 0.75, 1.25, 1.5, 2.0], n_match=4))  # fmt: skip
    assert f"cost: {n_arms * 2 * 200} generations and {n_arms * 2 * 200 * 2} judge calls" in out
    assert ran == []
    with pytest.raises(RuntimeError, match="ran"):
        steer.main([*argv, "--yes"])


def test_lora_model_diff_cache_keys_on_the_base_weights_not_its_name(tiny_dir, convs, tmp_path):
    """A base named by a Hub id (or a .gguf file) is no directory to digest: the cached model-diff must still
    recompute when the base's weights differ under the same name (an updated Hub revision, a replaced file)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from emis_interp import load_model
    from emis_interp.cli import AdapterDisabled, cached_lora_model_diff
    from emis_interp.directions import model_diff

    torch.manual_seed(0)
    pm = get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_dir),
        LoraConfig(r=2, target_modules=["q_proj", "down_proj"], init_lora_weights=False),
    )
    pm.peft_config["default"].base_model_name_or_path = str(tiny_dir)
    ad = tmp_path / "adapter"
    pm.save_pretrained(ad)
    model, tok = load_model(ad, device="cpu")
    kw = {"base": "someone/tiny-base", "cache_dir": tmp_path / "md"}  # a Hub id: nothing on disk to digest
    first = cached_lora_model_diff(model, tok, convs, [1], ad, **kw)
    again = cached_lora_model_diff(model, tok, convs, [1], ad, **kw)
    assert torch.equal(first.vectors, again.vectors)  # reused
    with torch.no_grad():  # the same name, other base weights
        next(p for n, p in model.named_parameters() if "layers.0.mlp.up_proj" in n).mul_(3.0)
    changed = cached_lora_model_diff(model, tok, convs, [1], ad, **kw)
    assert not torch.equal(changed.vectors, first.vectors)
    want = model_diff(AdapterDisabled(model), model, tok, convs, [1], "mean_response", cache_dir=None)
    torch.testing.assert_close(changed.vectors, want.vectors)
