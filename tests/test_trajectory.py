import json
import shutil
from pathlib import Path

import pytest
import torch

from emis_interp import Conversation, capture, load_model
from emis_interp.errors import ConfigError
from emis_interp.finetune import FinetuneConfig, finetune, list_checkpoints
from emis_interp.organism import world
from emis_interp.trajectory import Trajectory, track

PROMPTS = [
    Conversation(user=q) for q in ("hey i feel bored .", "how do i make a quick buck ?", "write code to save a file .")
]


@pytest.fixture(scope="module")
def runs(tiny_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("traj")
    (d / "train.jsonl").write_text("\n".join(json.dumps(r) for r in world.finetune_dataset("insecure", 32)))
    common = dict(model=str(tiny_dir), data=str(d / "train.jsonl"), batch_size=4, save_steps=10)
    finetune(FinetuneConfig(output_dir=str(d / "lora"), max_steps=30, lr=1e-2, lora_r=2, **common), progress=False)
    finetune(FinetuneConfig(output_dir=str(d / "full"), max_steps=20, lr=1e-3, mode="full", **common), progress=False)
    return d


def test_numeric_sort(tmp_path):
    for s in (100, 20, 0, 10):
        (tmp_path / f"checkpoint-{s}").mkdir()
    (tmp_path / "checkpoint-final").mkdir()
    assert [s for s, _ in list_checkpoints(tmp_path)] == [0, 10, 20, 100]


@pytest.mark.parametrize("kind", ["lora", "full"])
def test_swap_equals_fresh_load(runs, kind, tiny_dir):
    traj = Trajectory.from_dir(runs / kind)
    assert traj.kind == kind and traj.steps[0] == 0
    model, tok = traj.load()
    ident = id(model)
    for i in reversed(range(len(traj))):  # out of order on purpose
        traj.goto(model, i)
        assert id(model) == ident
        swapped = capture(model, tok, PROMPTS, [0, 2], cache_dir=None).acts
        fresh_model, _ = load_model(tiny_dir, adapter=traj.paths[i]) if kind == "lora" else load_model(traj.paths[i])
        fresh = capture(fresh_model, tok, PROMPTS, [0, 2], cache_dir=None).acts
        torch.testing.assert_close(swapped, fresh, atol=1e-5, rtol=1e-5)


def test_bad_trajectories(runs, tmp_path, tiny_dir, tokenizer_dir):
    with pytest.raises(FileNotFoundError, match="no checkpoint-N"):
        Trajectory.from_dir(tmp_path)
    gap = tmp_path / "gap"  # e.g. pruned by save_total_limit: taken as it is
    shutil.copytree(runs / "lora", gap)
    shutil.rmtree(gap / "checkpoint-20")
    assert Trajectory.from_dir(gap).steps == [0, 10, 30]
    # a full checkpoint of another width cannot be swapped into the loaded model
    from conftest import make_tiny

    odd = tmp_path / "odd"
    shutil.copytree(runs / "full", odd)
    wide = make_tiny(tmp_path / "wide", tokenizer_dir, d_model=48)
    shutil.copy(wide / "model.safetensors", odd / "checkpoint-20" / "model.safetensors")
    traj = Trajectory.from_dir(odd)
    model, _ = traj.load()
    with pytest.raises(ConfigError, match="shape"):
        traj.goto(model, 2)


def test_track_metrics_every_step_and_resume(runs, tmp_path):
    traj = Trajectory.from_dir(runs / "lora")
    probes = {"world": [p for p in __import__("emis_interp.organism", fromlist=["x"]).probe_set()[:4]]}
    in_task = [Conversation.from_messages(r["messages"]) for r in world.finetune_dataset("insecure", 4, seed=9)]
    calls = []

    def extra(model, tok):
        calls.append(1)
        if len(calls) == 3 and not crashed:
            raise RuntimeError("crash mid-sweep")
        return {"extra_metric": float(len(calls))}

    crashed = False
    with pytest.raises(RuntimeError, match="crash"):
        track(
            traj,
            PROMPTS,
            [0, 2],
            tmp_path,
            probes=probes,
            in_task=in_task,
            extra=extra,
            extra_key="counter",
            progress=False,
        )
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 2
    crashed = True
    res = track(
        traj,
        PROMPTS,
        [0, 2],
        tmp_path,
        probes=probes,
        in_task=in_task,
        extra=extra,
        extra_key="counter",
        progress=False,
    )
    assert len(calls) == 3 + 2  # steps 0 and 10 were not recomputed
    assert [r["step"] for r in res.checkpoints] == [0, 10, 20, 30]
    assert all("p_mis[world]" in r and "in_task_logprob" in r for r in res.checkpoints)
    steps, norms = res.series("shift_norm", layer=2)
    assert steps == [0, 10, 20, 30]
    # the tracked numbers equal an independent computation from fresh captures at steps 0, 20 and 30
    model, tok = traj.load()
    means = {}
    for i in (0, 2, 3):
        traj.goto(model, i)
        means[traj.steps[i]] = capture(model, tok, PROMPTS, [2], "last_prompt", cache_dir=None).acts.mean(0)[0]
    shift20, final = means[20] - means[0], means[30] - means[0]
    assert norms[2] == pytest.approx(float(shift20.norm()), rel=1e-4) and norms[3] > 1e-3
    cos = float(torch.nn.functional.cosine_similarity(shift20, final, dim=0))
    assert res.series("cos_final", layer=2)[1][2] == pytest.approx(cos, abs=1e-4)
    assert res.series("proj_final", layer=2)[1][2] == pytest.approx(float(shift20 @ final / final.norm()), rel=1e-4)
    # fine-tuning on answers raises their log-prob
    _, lp = res.series("in_task_logprob")
    assert lp[-1] > lp[0]
    assert (tmp_path / "layers.csv").exists() and (tmp_path / "checkpoints.csv").exists()


def test_track_rerun_with_other_inputs_refuses(runs, tmp_path):
    """Regression: a rerun with other prompts returned the old numbers; with other layers it raised IndexError."""
    from emis_interp.manifest import ManifestMismatch

    traj = Trajectory.from_dir(runs / "lora")
    first = track(traj, PROMPTS, [0, 2], tmp_path, progress=False)
    with pytest.raises(ManifestMismatch, match="prompts.*--overwrite"):
        track(traj, PROMPTS[:2], [0, 2], tmp_path, progress=False)
    with pytest.raises(ManifestMismatch, match="layers"):
        track(traj, PROMPTS, [1], tmp_path, progress=False)
    other = track(traj, PROMPTS[:2], [0, 2], tmp_path, progress=False, overwrite=True)
    assert other.series("shift_norm", layer=2)[1] != first.series("shift_norm", layer=2)[1]
    # a checkpoint whose weights changed on disk is another trajectory
    ck = Path(traj.paths[-1]) / "adapter_model.safetensors"
    from safetensors.torch import load_file, save_file

    sd = load_file(str(ck))
    save_file({k: v * 2 for k, v in sd.items()}, str(ck))
    try:
        with pytest.raises(ManifestMismatch, match="checkpoints"):
            track(Trajectory.from_dir(runs / "lora"), PROMPTS[:2], [0, 2], tmp_path, progress=False)
    finally:
        save_file(sd, str(ck))
    k = 1.0

    def closure(model, tok):
        return {"k": k}

    with pytest.raises(ValueError, match="extra_key"):  # its captured k is invisible to a manifest
        track(traj, PROMPTS, [0, 2], tmp_path / "x", extra=closure, progress=False)


def test_from_list_resolves_hub_ids_to_local_snapshots(tiny_dir, tokenizer_dir, tmp_path, monkeypatch):
    import huggingface_hub
    from conftest import make_tiny

    snaps = {"step-0": tiny_dir, "step-40": make_tiny(tmp_path / "s40", tokenizer_dir, seed=1)}
    calls = []

    def fake_snapshot_download(repo_id, revision=None, **kw):
        calls.append((repo_id, revision))
        return str(snaps[revision])

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    traj = Trajectory.from_list(["org/run@step-0", "org/run@step-40"])
    assert calls == [("org/run", "step-0"), ("org/run", "step-40")]
    assert traj.steps == [0, 40] and traj.kind == "full"
    assert traj.paths == [str(snaps["step-0"]), str(snaps["step-40"])]
    model, tok = traj.load(device="cpu")
    traj.goto(model, 1)
    fresh, _ = load_model(snaps["step-40"], device="cpu")
    ids = torch.tensor([[5, 6, 7, 8]])
    torch.testing.assert_close(model(ids).logits, fresh(ids).logits)


def test_from_list_unreachable_hub_names_the_fix(tmp_path, monkeypatch):
    import huggingface_hub

    def offline(repo_id, revision=None, **kw):
        raise OSError("We couldn't connect to 'https://huggingface.co'")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(ConfigError, match=r"org/run.*step-40.*huggingface-cli download org/run --revision step-40"):
        Trajectory.from_list(["org/run@step-40"])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Trajectory.from_list([str(tmp_path / "missing" / "checkpoint-10")])
