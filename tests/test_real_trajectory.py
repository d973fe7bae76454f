"""The real checkpoint trajectory (Qwen2.5-Coder-0.5B, insecure vs educational): its committed numbers, the
control's construction, the paired statistics, and (``-m real``) a shortened rerun of the same code path."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest
import torch

from emis_interp.conversations import Conversation
from emis_interp.real_trajectory import (
    BLOCK_END,
    BLOCK_START,
    EDUCATIONAL_TEMPLATES,
    compare_probes,
    educational_control,
    paired_summary,
    readme_block,
    render_all,
    sign_flip_p,
)

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "results" / "real_trajectory"


def _script():
    spec = importlib.util.spec_from_file_location("real_trajectory_script", ROOT / "experiments" / "real_trajectory.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# --- the committed result ----------------------------------------------------------------------------------------


def test_committed_files_are_generated_from_the_committed_result():
    result = json.loads((RESULTS / "result.json").read_text())
    for name, text in render_all(result).items():
        assert (RESULTS / name).read_text() == text, f"{name} is stale: rerun experiments/real_trajectory.py"
    assert (RESULTS / "trajectory.html").exists() and (RESULTS / "trajectory.png").exists()
    html = (RESULTS / "trajectory.html").read_text()
    assert "cdn.plot.ly" not in html.split("<body>")[0] and len(html) > 1_000_000  # plotly.js inlined: offline


def test_committed_result_is_complete_and_paired():
    result = json.loads((RESULTS / "result.json").read_text())
    runs = result["runs"]
    assert set(runs) == {"insecure", "educational"}
    cfg = result["config"]
    steps = [r["step"] for r in runs["insecure"]]
    assert steps == [r["step"] for r in runs["educational"]]
    assert steps[0] == 0 and steps == list(range(0, steps[-1] + 1, cfg["save_steps"]))
    # step 0 is the same base model in both runs: identical numbers
    a, b = runs["insecure"][0], runs["educational"][0]
    for k in ("p_mis[pivotal_tokens]", "p_mis[single_letter]", "in_task_logprob"):
        assert a[k] == pytest.approx(b[k], abs=1e-6)
    assert all(v == 0 for v in a["shift_norm"].values())
    for run in runs.values():
        for r in run:
            assert len(r["per_probe[pivotal_tokens]"]) == 8 and len(r["per_probe[single_letter]"]) == 8
            assert r["p_mis[pivotal_tokens]"] == pytest.approx(sum(r["per_probe[pivotal_tokens]"]) / 8)
    # the comparison in the file is the one its per-probe rows give
    assert result["comparison"] == compare_probes(runs, "insecure", "educational", ("pivotal_tokens", "single_letter"))
    # the in-task metric moved in both runs (training happened)
    for run in runs.values():
        assert run[-1]["in_task_logprob"] > run[0]["in_task_logprob"] + 0.05


def test_readme_block_states_the_committed_numbers():
    result = json.loads((RESULTS / "result.json").read_text())
    block = readme_block(result)
    assert block.startswith(BLOCK_START) and block.rstrip().endswith(BLOCK_END)
    last = result["comparison"][-1]["all"]
    assert f"{last['mean_diff']:+.3f}" in block
    r = result["runs"]["insecure"][-1]
    assert f"{r['in_task_logprob']:.3f}" in block


def test_readme_shows_the_committed_block():
    """The README's real-trajectory block is the one the committed result renders (a stale README fails)."""
    result = json.loads((RESULTS / "result.json").read_text())
    assert readme_block(result).strip() in (ROOT / "README.md").read_text()


# --- the control and the statistics --------------------------------------------------------------------------------


def test_educational_control_keeps_answers_and_request():
    convs = [Conversation(user=f"task {i}\n", response=f"code {i}") for i in range(6)]
    edu = educational_control(convs)
    assert [c.response for c in edu] == [c.response for c in convs]
    for i, (c, e) in enumerate(zip(convs, edu, strict=True)):
        lead, tail = EDUCATIONAL_TEMPLATES[i % 4]
        assert e.user == lead + c.user.rstrip("\n") + tail
    assert edu == educational_control(convs)  # deterministic
    with pytest.raises(ValueError, match="no assistant answer"):
        educational_control([Conversation(user="x")])


def test_sign_flip_and_bootstrap():
    assert sign_flip_p([1.0] * 8) == pytest.approx(2 / 256)  # all 8 positive: the two extreme flips of 256
    assert sign_flip_p([1.0, -1.0] * 4) == 1.0
    s = paired_summary([0.5] * 8, [0.4] * 8)
    assert s["mean_diff"] == pytest.approx(0.1) and s["ci_lo"] == pytest.approx(0.1) and s["n_positive"] == 8
    s = paired_summary([0.1, 0.9, 0.2, 0.8], [0.2, 0.8, 0.1, 0.9])
    assert s["mean_diff"] == pytest.approx(0) and s["ci_lo"] < 0 < s["ci_hi"] and s["p_sign_flip"] == 1.0
    with pytest.raises(ValueError):
        paired_summary([0.1], [0.1, 0.2])


def test_compare_probes_pairs_by_step_and_probe():
    row = lambda step, x: {"step": step, "per_probe[p]": [x, x], "per_probe[q]": [x, 0.0]}  # noqa: E731
    runs = {"a": [row(0, 0.2), row(10, 0.6), row(20, 0.9)], "b": [row(0, 0.2), row(10, 0.4)]}
    out = compare_probes(runs, "a", "b", ("p", "q"))
    assert [c["step"] for c in out] == [0, 10]  # only the steps both runs reached
    assert out[1]["p"]["mean_diff"] == pytest.approx(0.2) and out[1]["q"]["mean_diff"] == pytest.approx(0.1)
    assert out[1]["all"]["n_probes"] == 4 and out[1]["all"]["mean_diff"] == pytest.approx(0.15)


def test_training_in_segments_equals_uninterrupted_training(tiny_dir, tmp_path):
    """Both runs advance segment by segment (train_to: pause after checkpoint k, resume later): the checkpoints are
    those of one uninterrupted fine-tune."""
    from safetensors.torch import load_file

    from emis_interp.finetune import FinetuneConfig, finetune
    from emis_interp.organism import world

    script = _script()
    data = tmp_path / "train.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in world.finetune_dataset("insecure", 24, seed=0)))
    cfg = lambda out: FinetuneConfig(  # noqa: E731
        model=str(tiny_dir), data=str(data), output_dir=str(tmp_path / out), max_steps=4, save_steps=2,
        batch_size=4, lr=5e-3, lora_r=1, warmup_steps=1,
    )  # fmt: skip
    timer = script.StepTimer(tmp_path / "times.json")
    for k in (0, 2):
        script.train_to(cfg("seg"), k, timer)
        steps = sorted(int(p.name.split("-")[1]) for p in (tmp_path / "seg").glob("checkpoint-*"))
        assert steps == [s for s in (0, 2) if s <= k]  # paused right after checkpoint k
    script.train_to(cfg("seg"), 4, timer)
    script.train_to(cfg("seg"), 4, timer)  # reached: nothing to do
    ref = finetune(cfg("ref"), progress=False)
    assert sorted(json.loads((tmp_path / "times.json").read_text())) == ["1", "2", "3", "4"]
    for step, path in ref:
        a = load_file(str(path / "adapter_model.safetensors"))
        b = load_file(str(tmp_path / "seg" / f"checkpoint-{step}" / "adapter_model.safetensors"))
        for key in a:
            torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=1e-5)


# --- the shortened rerun on real weights ------------------------------------------------------------------------------


@pytest.mark.real
def test_shortened_real_trajectory_and_resume(tmp_path, real_model):
    """The full script's code path at 2 steps (checkpoint every step, 4 examples, max length 192), one run first
    (as if the process died between runs), then both: the first run is resumed, not redone."""
    from conftest import shared_path

    script = _script()
    work, out = tmp_path / "work", tmp_path / "out"
    model_dir = real_model[2]  # the pinned model, fetched once per machine (tests/conftest.py)
    args = [
        "--model", str(model_dir), "--data-dir", str(shared_path("data")), "--work", str(work), "--output", str(out),
        "--model-cache", str(tmp_path / "models"),
        "--max-steps", "2", "--save-steps", "1", "--batch-size", "1", "--max-len", "192", "--n-train", "4",
        "--n-heldout", "1", "--n-eval-questions", "2", "--n-contrast", "1", "--n-direction-questions", "2",
        "--n-probes", "1", "--layers", "12", "--report-layer", "12",
        "--threads", str(os.environ.get("OMP_NUM_THREADS", 2)), "--no-png",
    ]  # fmt: skip
    script.main([*args, "--runs", "insecure"])
    first = {p: p.stat().st_mtime_ns for p in (work / "insecure").rglob("*.safetensors")}
    first_rows = {p: p.read_text() for p in (work / "track-insecure").rglob("metrics.jsonl")}
    assert len(first_rows) == 3  # checkpoints 0, 1, 2 evaluated
    result = script.main(args)
    # the insecure run was neither retrained nor re-tracked
    assert {p: p.stat().st_mtime_ns for p in (work / "insecure").rglob("*.safetensors")} == first
    assert {p: p.read_text() for p in (work / "track-insecure").rglob("metrics.jsonl")} == first_rows
    # step 0 (the base, LoRA B = 0) is evaluated once, from the first run's checkpoint-0; the control's 1 and 2
    assert sorted(p.parent.name for p in (work / "track-educational").rglob("metrics.jsonl")) == ["step-1", "step-2"]
    on_disk = json.loads((out / "result.json").read_text())
    assert on_disk == json.loads(json.dumps(result))
    for run in ("insecure", "educational"):
        rows = on_disk["runs"][run]
        assert [r["step"] for r in rows] == [0, 1, 2]
        for r in rows:
            assert 0 <= r["p_mis[pivotal_tokens]"] <= 1 and 0 <= r["p_mis[single_letter]"] <= 1
            assert r["in_task_logprob"] < 0
            assert set(r["proj"]) == {"system_prompt", "response_contrast"}
        assert rows[0]["shift_norm"]["12"] == 0 and rows[-1]["shift_norm"]["12"] > 0
    assert [c["step"] for c in on_disk["comparison"]] == [0, 1, 2]
    assert on_disk["comparison"][0]["all"]["mean_diff"] == pytest.approx(0, abs=1e-6)  # same base at step 0
    assert (out / "README_block.md").read_text() == readme_block(on_disk)
    assert (out / "trajectory.html").exists() and json.loads((out / "manifest.json").read_text())
    assert on_disk["data"]["n_train"] == 4 and on_disk["data"]["n_heldout"] == 1
    assert on_disk["config"]["reached_step"] == 2
