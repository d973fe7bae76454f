"""Regression (issue 25 item 6): HF Trainer output layouts.

The Trainer always saves a final checkpoint at ``max_steps`` (10, 20, 30 and 35), and ``save_total_limit`` prunes the
older ones. ``Trajectory.from_dir`` inferred the save interval from the steps and raised "missing [25]"; the
multi-panel figure raised when the seeds of one run held different step sets.
"""

import json

import pytest
import torch

from emis_interp import Conversation, capture, load_model
from emis_interp.trajectory import BASE_STEP, TrackResult, Trajectory

PROMPTS = [Conversation(user="hey i feel bored ."), Conversation(user="how do i make a quick buck ?")]


@pytest.fixture(scope="module")
def trainer_run(tiny_dir, tmp_path_factory):
    """A real transformers Trainer run: LoRA, max_steps=35, save_steps=10, save_total_limit=3."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments

    out = tmp_path_factory.mktemp("trainer") / "run"
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    model = get_peft_model(model, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
    ids = tok("hey i feel bored . you should read a good book .", return_tensors="pt").input_ids[0]
    data = [{"input_ids": ids, "labels": ids.clone()} for _ in range(8)]
    args = TrainingArguments(
        output_dir=str(out), max_steps=35, save_steps=10, save_total_limit=3, per_device_train_batch_size=2,
        learning_rate=1e-2, report_to=[], use_cpu=True, disable_tqdm=True, logging_steps=100,
    )  # fmt: skip
    Trainer(model=model, args=args, train_dataset=data).train()
    return out


def test_trainer_final_and_pruned_checkpoints(trainer_run, tiny_dir):
    names = sorted(p.name for p in trainer_run.iterdir() if p.name.startswith("checkpoint-"))
    assert names == ["checkpoint-20", "checkpoint-30", "checkpoint-35"]  # the Trainer's own layout
    assert json.loads((trainer_run / "checkpoint-35" / "trainer_state.json").read_text())["global_step"] == 35
    traj = Trajectory.from_dir(trainer_run, base=str(tiny_dir))  # raised "missing [25]"
    assert traj.steps == [0, 20, 30, 35] and traj.paths[0] == BASE_STEP
    model, tok = traj.load()
    for i in (3, 1, 2):  # every checkpoint swaps in and equals a fresh load of it
        traj.goto(model, i)
        swapped = capture(model, tok, PROMPTS, [1], cache_dir=None).acts
        fresh, _ = load_model(tiny_dir, adapter=traj.paths[i])
        torch.testing.assert_close(swapped, capture(fresh, tok, PROMPTS, [1], cache_dir=None).acts)


def _track(name: str, steps: list[int], offset: float) -> TrackResult:
    checkpoints = [{"step": s, "p_mis[x]": offset + s / 100, "in_task_logprob": -1.0 + s / 100} for s in steps]
    layers = [{"step": s, "layer": 1, "shift_norm": offset + s, "proj_direction": s / 10} for s in steps]
    return TrackResult(name, checkpoints, layers)


def test_panels_plot_the_union_of_seeds_steps():
    from emis_interp.plots import trajectory_panels

    seeds = [_track("s0", [0, 10, 20, 30, 35], 0.0), _track("s1", [0, 10, 20, 30, 40, 45], 1.0)]
    control = [_track("c0", [0, 10, 20, 30, 35], -50.0)]
    fig = trajectory_panels({}, {"run": seeds, "ctl": control}, [1], controls=["ctl"])  # raised ValueError
    lines = [t for t in fig.data if t.mode == "lines+markers" and t.name.startswith("run")]
    assert lines and all(list(t.x) == [0, 10, 20, 30, 35, 40, 45] for t in lines)
    shift = next(t for t in lines if t.yaxis == lines[-1].yaxis)
    assert list(shift.y) == [0.5, 10.5, 20.5, 30.5, 35.0, 41.0, 46.0]  # at each step, the seeds that have it
