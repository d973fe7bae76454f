"""Every code block in the README is run by a test: Python blocks here, shell lines by the tests named below."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
BLOCKS = re.findall(r"```(\w+)\n(.*?)```", README, flags=re.S)

# each shell line of the README -> where the suite runs it
SHELL = {
    'python3 -m venv .venv && . .venv/bin/activate && pip install torch==2.13.0 -e ".[dev]"': ".ci/run",
    ".venv/bin/python -m pytest": ".ci/run",
    ".venv/bin/python -m pytest -m science": ".ci/run",
    ".venv/bin/python -m pytest -m real": ".ci/run",
    "python experiments/steer.py --alpha -4": "test_experiments.py::test_steer_cli_exits_0_and_lowers_misalignment",
    "python experiments/ablate.py": "test_experiments.py::test_ablate_cli_lowers_misalignment_and_exports",
    "python experiments/trajectory.py": "test_experiments.py::test_trajectory_cli_on_organism",
    "python experiments/persona_views.py": "test_experiments.py::test_persona_views_cli_on_organism",
    "python experiments/build_organism.py --overwrite-shipped-weights": "test_readme.py::test_build_organism_is_deterministic (reduced steps, into --output)",
    "python experiments/build_organism.py --overwrite-shipped-weights --aligned-only": "test_readme.py::test_build_organism_is_deterministic",
}


def test_shell_blocks_are_known_commands():
    ci = (ROOT / ".ci" / "run").read_text()
    for lang, body in BLOCKS:
        if lang != "bash":
            continue
        for line in body.strip().splitlines():
            assert line in SHELL, f"README command not covered by a test: {line}"
            if SHELL[line] == ".ci/run":
                assert line in ci.splitlines()


@pytest.mark.science  # needs organism fine-tunes
def test_python_blocks_run(tmp_path):
    code = "\n\n".join(body for lang, body in BLOCKS if lang == "python")
    assert code
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]


@pytest.mark.science  # rebuilds the organism (world corpus, pre-training, instruct stage) four times: minutes
def test_build_organism_is_deterministic(tmp_path):
    from safetensors.torch import load_file

    outs = []
    for k in range(2):
        cmd = [
            sys.executable,
            "experiments/build_organism.py",
            "--output",
            str(tmp_path / str(k)),
            "--pretrain-steps",
            "3",
            "--instruct-steps",
            "2",
        ]
        r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
        outs.append(load_file(str(tmp_path / str(k) / "aligned" / "model.safetensors")))
    assert outs[0].keys() == outs[1].keys() and all((outs[0][n] == outs[1][n]).all() for n in outs[0])
    assert (tmp_path / "0" / "base" / "tokenizer.json").read_text() == (
        tmp_path / "1" / "base" / "tokenizer.json"
    ).read_text()
    # --aligned-only redoes the instruct stage from the base in --output, deterministically
    again = []
    for _ in range(2):
        cmd = [sys.executable, "experiments/build_organism.py", "--output", str(tmp_path / "0"), "--aligned-only",
               "--instruct-steps", "2"]  # fmt: skip
        r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
        again.append(load_file(str(tmp_path / "0" / "aligned" / "model.safetensors")))
    assert all((again[0][n] == again[1][n]).all() for n in again[0])
