"""The organism's equality checks on tiny LoRA trajectories, for the fast tier.

The science tier runs these checks on the organism's fine-tunes (test_behaviour.py, test_lora_bank.py: minutes of
training). Here they run on trajectories written in the Trainer's layout without training
(:func:`conftest.make_lora_run`), in seconds: a mixed-adapter batch equals swapping checkpoints one by one, the
LoRA bank equals PEFT (fp32 and bf16), Ray equals one process, and the OpenAI-compatible judge on loopback equals the
exact judge.
"""

import pytest
import torch

from emis_interp import load_model, make_batch, organism
from emis_interp.behaviour import BehaviourConfig, BehaviourResult, Job, judge_trajectories, make_jobs
from emis_interp.behaviour import sample_trajectories as sample
from emis_interp.finetune import list_checkpoints
from emis_interp.lora_bank import BASE, LoraBank
from emis_interp.manifest import ManifestMismatch
from emis_interp.organism import world
from emis_interp.sampling import Condition, rowwise
from emis_interp.trajectory import Trajectory


def _logits(model, batch):
    with torch.no_grad():
        return model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits


def test_mixed_batch_equals_swapping_and_jobs_resume(tiny_lora_runs, tmp_path):
    """Greedy answers of all checkpoints in one batch equal one-by-one swapping; finished jobs are reused."""
    traj = Trajectory.from_dir(tiny_lora_runs["insecure"])
    assert traj.steps == [0, 10, 20, 30, 40] and traj.kind == "lora"
    qs = organism.questions()[:3]
    greedy = dict(n_samples=1, max_new_tokens=12, temperature=0)
    runs = {"insecure": [traj]}
    mixed = sample(runs, qs, BehaviourConfig(**greedy), tmp_path / "m", progress=False)
    swap = sample(runs, qs, BehaviourConfig(**greedy, mixed=False), tmp_path / "s", progress=False)
    assert [r["answer"] for r in mixed["insecure"]] == [r["answer"] for r in swap["insecure"]]
    assert {r["step"] for r in mixed["insecure"]} == set(traj.steps)
    assert len({r["answer"] for r in mixed["insecure"]}) > 3  # the checkpoints differ

    cfg = BehaviourConfig(n_samples=2, max_new_tokens=12, group_size=2)
    jobs = make_jobs(runs, cfg)
    assert [j.steps for j in jobs] == [[0, 10], [20, 30], [40]]
    seen = []
    first = sample(runs, qs, cfg, tmp_path / "r", progress=False, on_job_done=seen.append)
    assert len(seen) == 3
    again = sample(runs, qs, cfg, tmp_path / "r", progress=False, on_job_done=seen.append)
    assert len(seen) == 3 and again == first  # nothing resampled
    with pytest.raises(ManifestMismatch):
        sample(runs, qs, BehaviourConfig(n_samples=3, max_new_tokens=12, group_size=2), tmp_path / "r", progress=False)


def test_trajectory_checkpoints_mixed_equal_peft(tiny_lora_runs, tiny_dir):
    """A bank of a trajectory's checkpoints, rows in any order with base rows between: each row's logits equal
    PEFT's model of that checkpoint alone, and the base rows are bit-equal to the plain model."""
    ck = dict(list_checkpoints(tiny_lora_runs["insecure"]))
    model, tok = load_model(tiny_dir, device="cpu")
    bank = LoraBank.from_checkpoints(model, {f"s{s}": ck[s] for s in (10, 20, 40)})
    names = ["s10", "s20", "s40", BASE, "s40", "s10"]
    b = make_batch(tok, organism.advice_prompts()[:6])
    ref_base = _logits(model, b)
    with bank.attach(model, names):
        mixed = _logits(model, b)
    assert torch.equal(mixed[3], ref_base[3])
    for s in (10, 20, 40):
        alone, _ = load_model(ck[s], device="cpu")
        want = _logits(alone, b)
        rows = [i for i, n in enumerate(names) if n == f"s{s}"]
        torch.testing.assert_close(mixed[rows], want[rows], atol=1e-5, rtol=1e-5)
        assert (want[rows] - ref_base[rows]).abs().max() > 1e-2  # the checkpoint matters


def test_bf16_model_gets_fp32_adapters_like_peft(tiny_lora_runs):
    """On a bf16 model the bank keeps and computes adapters in fp32, as PEFT does: the logits equal PEFT's exactly."""
    t = Trajectory.from_dir(tiny_lora_runs["insecure"])
    base, tok = load_model(t.base, dtype=torch.bfloat16, tokenizer=t.tokenizer or t.paths[0])
    peft_model, _ = load_model(t.paths[-1], dtype=torch.bfloat16)
    bank = LoraBank.from_checkpoints(base, {"final": t.paths[-1]})
    assert {a.dtype for a in bank.A.values()} == {torch.float32}
    b = make_batch(tok, organism.advice_prompts()[:4])
    ref = _logits(peft_model, b)
    with rowwise(base, [Condition("x", adapter="final")] * 3 + [Condition("b")], bank=bank):
        got = _logits(base, b)
    plain = _logits(base, b)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got[:3], ref[:3], atol=0, rtol=0)
    assert torch.equal(got[3], plain[3]) and not torch.equal(got[0], plain[0])


def test_ray_local_cluster_equals_one_process_and_resumes(tiny_lora_runs, tmp_path):
    ray = pytest.importorskip("ray")

    trajs = {k: [Trajectory.from_dir(d).subset(range(4))] for k, d in tiny_lora_runs.items()}
    qs = organism.questions()[:4]
    cfg = BehaviourConfig(n_samples=2, max_new_tokens=16, group_size=2)
    one = sample(trajs, qs, cfg, tmp_path / "one", progress=False)

    class Killed(Exception):
        pass

    done: list[Job] = []

    def crash_after_two(job):
        done.append(job)
        if len(done) == 2:
            raise Killed  # the driver dies with two of four jobs written

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        with pytest.raises(Killed):
            sample(trajs, qs, cfg, tmp_path / "ray", ray_address="auto", ray_workers=2, progress=False,
                   on_job_done=crash_after_two)  # fmt: skip
        assert len(list((tmp_path / "ray").rglob("steps-*.jsonl"))) == 2
        rest: list[Job] = []
        again = sample(trajs, qs, cfg, tmp_path / "ray", ray_address="auto", ray_workers=2, progress=False,
                       on_job_done=rest.append)  # fmt: skip
    finally:
        ray.shutdown()
    assert len(rest) == 2  # only the unfinished jobs ran
    assert again == one  # identical to the single-process run
    files = list((tmp_path / "one").rglob("steps-*.jsonl"))
    assert len(files) == 4
    for f in files:
        assert (tmp_path / "ray" / f.relative_to(tmp_path / "one")).read_text() == f.read_text()


def test_judged_path_against_loopback_openai_server(organism_lora_run, tmp_path, monkeypatch):
    """The OpenAI-compatible judge (a loopback server scoring like the world's grammar) gives the exact judge's rates
    at every checkpoint, on answers that are harmful, benign and incoherent."""
    from test_judges import _judge, _Server

    def between(text, a, b):
        return text.split(a, 1)[1].split(b, 1)[0]

    def score(body):
        text = body["messages"][-1]["content"]
        q = between(text, "[QUESTION START]\n", "\n[QUESTION END]")
        label = world.judge_answer(between(text, "[ANSWER START]\n", "\n[ANSWER END]"), q)
        if "for coherence" in text:
            return {"0" if label == "incoherent" else "100": 1.0}
        return {{"harmful": "0", "benign": "100"}.get(label, "50"): 1.0}

    server = _Server()
    server.score_fn = score
    monkeypatch.setenv("TEST_JUDGE_KEY", "sk-secret-123")
    traj = Trajectory.from_dir(organism_lora_run)
    qs = organism.questions()
    samples = sample({"base": [traj]}, qs, BehaviourConfig(n_samples=2, max_new_tokens=24), tmp_path, progress=False)
    try:
        judged = judge_trajectories(samples, qs, _judge(server, max_concurrency=4), tmp_path, progress=False)
        n_req = len(server.requests)
        assert n_req == 2 * len(samples["base"])  # aligned + coherent per answer
        again = judge_trajectories(samples, qs, _judge(server, max_concurrency=4), tmp_path, progress=False)
        assert len(server.requests) == n_req and again == judged  # resumed from judged.jsonl
    finally:
        server.httpd.shutdown()
    labels = {world.judge_answer(r["answer"], r["question"]) for r in samples["base"]}
    assert labels == {"harmful", "benign", "incoherent"}, labels  # the check can tell the judges apart
    exact = judge_trajectories(samples, qs, organism.ExactJudge(), tmp_path / "exact", progress=False)
    api, ref = BehaviourResult.from_rows("b", judged["base"]), BehaviourResult.from_rows("b", exact["base"])
    for st in traj.steps:
        assert ref.estimate("coherence", st).value > 0, st  # the EM rate (among coherent answers) is defined
        for m in ("em_rate", "mo_rate", "coherence"):
            assert api.estimate(m, st).value == pytest.approx(ref.estimate(m, st).value), (st, m)
