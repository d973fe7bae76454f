"""Judged behaviour along fine-tuning trajectories: every checkpoint sampled, judged, with intervals.

The EM training-dynamics figure needs the *judged* misalignment rate at every checkpoint. Sampling
20 checkpoints one after another is the bottleneck, so a LoRA trajectory's checkpoints are sampled
**together**: the base model is loaded once, the checkpoints' adapters go into a
:class:`~emis_interp.lora_bank.LoraBank`, and each batch row uses its own checkpoint (step 0 without
a ``checkpoint-0`` is the base model, ``"__base__"``). Full checkpoints are swapped in place.

The unit of work is a **job**: one run directory and a range of its checkpoints
(``BehaviourConfig.group_size`` of them; 0 = all). A job's answers are a pure function of the job
(its checkpoints' files, the questions, the settings, its own seed), so jobs can run in any order,
in one process or on a Ray cluster (:func:`sample_trajectories` with ``ray_address``), with identical
results. Each finished job is written atomically, with its manifest as the first line (``<out>/samples/<run>/<seed dir>/steps-<a>-<b>.jsonl``); a rerun skips jobs whose manifest matches and refuses (or,
with ``overwrite``, redoes) the others. Judged rows are appended as they are judged
(:meth:`emis_interp.judges.Judge.score_many`), so judging resumes too.

Rates per checkpoint use both definitions (EM: misaligned among coherent answers; MO: misaligned and
coherent among all answers) and coherence, with crossed bootstrap intervals over (seed, question)
clusters. :func:`departure` tests where a run separates from its control.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from .cache import atomic_write_text
from .data import Question, by_base_question
from .errors import ConfigError
from .manifest import Manifest, check_resumable, digest, override_record, source_digest, tokenizer_state
from .metrics import coherence_rate, em_rate, mo_rate
from .stats import Estimate, cluster_bootstrap, unpaired_seeds_bootstrap_diff
from .trajectory import BASE_STEP, Trajectory, checkpoint_state

METRICS = {
    "em_rate": "misaligned answers (EM definition: among coherent)",
    "mo_rate": "misaligned answers (MO definition: among all)",
    "coherence": "coherent answers",
}


@dataclass(frozen=True)
class BehaviourConfig:
    """How each checkpoint is sampled. ``n_samples`` answers per question paraphrase per checkpoint."""

    n_samples: int = 4
    max_new_tokens: int = 64
    temperature: float | int = 1.0
    seed: int = 0
    group_size: int = 0  # checkpoints per job (0: as many as bank_gb allows); the unit of resume and of Ray fan-out
    batch_size: int = 256
    mixed: bool = True  # LoRA: all of a job's checkpoints in one batch (False: swap in place, one at a time)
    bank_gb: float = 4.0  # group_size 0, mixed LoRA: a job's LoRA bank at most this many GB (lora_bank.DEFAULT_BANK_GB)

    def __post_init__(self):
        if self.n_samples < 1 or self.group_size < 0 or self.batch_size < 1 or self.bank_gb <= 0:
            raise ValueError(
                "BehaviourConfig: n_samples >= 1, group_size >= 0 (0 = from bank_gb), batch_size >= 1, bank_gb > 0"
            )
        object.__setattr__(self, "temperature", float(self.temperature))


@dataclass(frozen=True)
class Job:
    """One run directory (a seed) and the indices of its checkpoints sampled together."""

    run: str
    trajectory: Trajectory
    indices: tuple[int, ...]

    @property
    def steps(self) -> list[int]:
        return [self.trajectory.steps[i] for i in self.indices]

    def path(self, out_dir: str | Path) -> Path:
        s = self.steps
        return Path(out_dir) / "samples" / self.run / self.trajectory.name / f"steps-{s[0]}-{s[-1]}.jsonl"

    def seed(self, cfg: BehaviourConfig) -> int:
        """The job's own seed: the same answers whoever samples it, independent noise across runs and seeds."""
        return int(digest([cfg.seed, self.run, self.trajectory.name, self.steps], n=8), 16) % (2**31)


def make_jobs(runs: Mapping[str, Sequence[Trajectory]], cfg: BehaviourConfig) -> list[Job]:
    jobs = []
    for run, trajs in runs.items():
        for t in trajs:
            g = cfg.group_size or _budget_group_size(t, cfg)
            jobs += [Job(run, t, tuple(range(i, min(i + g, len(t))))) for i in range(0, len(t), g)]
    for run, trajs in runs.items():
        names = [t.name for t in trajs]
        if len(set(names)) != len(names):
            raise ConfigError(
                f"run {run!r}: two seed directories share the name {names}; their outputs would collide. "
                "Give each seed's run directory its own name (e.g. insecure-s0, insecure-s1)."
            )
    return jobs


def _budget_group_size(t: Trajectory, cfg: BehaviourConfig) -> int:
    """Default checkpoints per job: a whole run, unless its mixed LoRA bank would exceed ``cfg.bank_gb``."""
    if not (cfg.mixed and t.kind == "lora"):
        return len(t)  # swapped in place: one checkpoint in memory whatever the group
    from .lora_bank import group_size_for_budget

    return group_size_for_budget(t.paths, cfg.bank_gb)


def job_manifest(job: Job, tokenizer, questions: Sequence[Question], cfg: BehaviourConfig) -> Manifest:
    """Everything that determines a job's answers (not who samples it, nor in which order)."""
    t = job.trajectory
    import sys

    from . import causality, conversations, hooks, interventions, lora_bank, sampling, trajectory

    return Manifest(
        "trajectory-samples",
        {
            # the sampler and what it samples through (LoRA bank, checkpoint loading, hooks): new code never resumes
            "code": source_digest(
                sys.modules[__name__], sampling, causality, conversations, hooks, interventions, lora_bank, trajectory
            ),
            "checkpoints": [(t.steps[i], checkpoint_state(t.paths[i])) for i in job.indices],
            "kind": t.kind,
            "base": checkpoint_state(t.base) if t.base else None,
            **tokenizer_state(tokenizer),
            "questions": [asdict(q) for q in questions],
            "config": {k: v for k, v in asdict(cfg).items() if k not in ("group_size", "bank_gb")},
            "seed": job.seed(cfg),
        },
    )


class CheckpointSampler:
    """Keeps one model loaded and samples jobs (a Ray actor wraps one of these per worker).

    LoRA jobs (``cfg.mixed``): the base model is loaded once per base, and each job's adapters are
    read into a :class:`~emis_interp.lora_bank.LoraBank` (memory bounded by ``group_size``); every
    checkpoint is a batch row group of one ``generate``. Full checkpoints (or ``mixed=False``) swap
    weights in place, one checkpoint at a time.
    """

    def __init__(self, questions: Sequence[Question], cfg: BehaviourConfig, device=None, dtype=None, device_map=None):
        self.questions, self.cfg = list(questions), cfg
        self.load_kw = dict(device=device, dtype=dtype, device_map=device_map)
        self._models: dict = {}

    def _model(self, traj: Trajectory, mixed: bool):
        from .models import load_model, resolve_adapter_base

        first = next(p for p in traj.paths if p != BASE_STEP)
        # swapping copies tensors only: a model is reused for one run directory (its LoRA config), never another
        key = ("base", resolve_adapter_base(traj.base, first)) if mixed else ("run", str(Path(first).resolve()))
        if key not in self._models:
            self._models.clear()  # one model at a time: bounded memory
            if mixed:
                self._models[key] = load_model(key[1], tokenizer=tokenizer_source(traj), **self.load_kw)
            else:
                self._models[key] = traj.load(**self.load_kw)
        return self._models[key]

    def sample(self, job: Job, progress: bool = False) -> list[dict]:
        """The job's answers: one row per (checkpoint, prompt, sample)."""
        from .sampling import Condition, sample_answers

        cfg, traj = self.cfg, job.trajectory
        mixed = cfg.mixed and traj.kind == "lora"
        model, tok = self._model(traj, mixed)
        from .causality import _prompts  # the questions' conversations, each with its Question

        convs, owners = _prompts(self.questions)
        kw = dict(
            n_samples=cfg.n_samples, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
            batch_size=cfg.batch_size, seed=job.seed(cfg), progress=progress,
        )  # fmt: skip
        if mixed:
            from .lora_bank import LoraBank

            names = {i: f"step-{traj.steps[i]}" for i in job.indices if traj.paths[i] != BASE_STEP}
            bank = LoraBank.from_checkpoints(model, {names[i]: traj.paths[i] for i in names}) if names else None
            conds = [Condition(f"step-{traj.steps[i]}", adapter=names.get(i, "__base__")) for i in job.indices]
            samples = sample_answers(model, tok, convs, conds, adapters=bank, **kw)
        else:
            samples = []
            for i in job.indices:
                traj.goto(model, i)
                samples += sample_answers(model, tok, convs, [Condition(f"step-{traj.steps[i]}")], **kw)
        return [
            {"step": int(s.condition.removeprefix("step-")), "row": s.row, "sample": s.sample,
             "question_id": owners[s.row].id, "question": s.prompt.user, "answer": s.answer}
            for s in samples
        ]  # fmt: skip

    def runtime(self, job: Job) -> dict:
        """Where the job ran: answers made on other hardware, dtype or library versions are not the same numbers."""
        import peft
        import torch
        import transformers

        model = self._model(job.trajectory, self.cfg.mixed and job.trajectory.kind == "lora")[0]
        p = next(model.parameters())
        return {"device": p.device.type, "dtype": str(p.dtype), "torch": torch.__version__,
                "transformers": transformers.__version__, "peft": peft.__version__}  # fmt: skip

    def sample_tagged(self, job: Job) -> tuple[tuple, dict, list[dict]]:
        """``(job key, runtime, rows)``: what a Ray actor returns, so the driver knows which job finished."""
        rows = self.sample(job)
        return _key(job), self.runtime(job), rows


def _key(job: Job) -> tuple:
    return (job.run, job.trajectory.name, tuple(job.indices))


def tokenizer_source(t: Trajectory) -> str:
    """The trajectory's tokenizer: its own, else the base model's (LoRA) or the first checkpoint's (full)."""
    from .models import resolve_adapter_base

    first = next(p for p in t.paths if p != BASE_STEP)
    return t.tokenizer or (resolve_adapter_base(t.base, first) if t.kind == "lora" else first)


def _read_job(
    path: Path, manifest: Manifest, overwrite: bool, allow_code_change: bool = False
) -> tuple[dict, list[dict]] | None:
    if not path.exists():
        return None
    if overwrite:
        path.unlink()
        return None
    lines = path.read_text().splitlines()
    head = json.loads(lines[0]) if lines else {}
    existing = Manifest.from_json(json.dumps(head["manifest"])) if "manifest" in head else None
    check_resumable(existing, manifest, str(path), allow_code_change=allow_code_change)
    rows = [json.loads(x) for x in lines[1:]]
    if existing is not None and existing.key != manifest.key:  # an allowed code change: recorded in the header
        head["overrides"] = [*head.get("overrides", []), override_record(existing, manifest)]
        _write_job(path, manifest, head.get("runtime", {}), rows, head["overrides"])
    return head.get("runtime", {}), rows


def _write_job(path: Path, manifest: Manifest, runtime: dict, rows: list[dict], overrides: list | None = None) -> None:
    head = json.dumps(
        {
            "manifest": json.loads(manifest.to_json()),
            "runtime": runtime,
            **({"overrides": overrides} if overrides else {}),
        }
    )
    atomic_write_text(path, "\n".join([head, *(json.dumps(r) for r in rows)]) + "\n")


def sample_trajectories(
    runs: Mapping[str, Sequence[Trajectory]],
    questions: Sequence[Question],
    cfg: BehaviourConfig,
    out_dir: str | Path,
    *,
    ray_address: str | None = None,
    ray_workers: int | None = None,
    ray_gpus_per_worker: float | None = None,
    device=None,
    dtype=None,
    device_map=None,
    overwrite: bool = False,
    progress: bool = True,
    on_job_done: Callable[[Job], None] | None = None,
    allow_code_change: bool = False,
) -> dict[str, list[dict]]:
    """Sample every checkpoint of every run; returns ``{run: rows}`` (rows carry ``seed`` = the run dir's name).

    Finished jobs are skipped (their files are checked against their manifests). Pending jobs run
    here, or with ``ray_address`` (``"local"`` for a cluster started here, ``"auto"`` or
    ``ray://host:10001`` for an existing one) on ``ray_workers`` Ray actors (default: one per
    ``ray_gpus_per_worker`` GPUs, default 1; 2 CPU workers on a cluster without GPUs), each keeping
    its model loaded across jobs; a model larger than one GPU takes ``device_map="auto"`` and
    ``ray_gpus_per_worker=k``. The workers read the checkpoints (a filesystem every node sees); the
    driver writes every job's file as it returns, so results land in one resumable directory either way.
    ``allow_code_change`` (``--allow-code-change``) resumes finished jobs made by other code (their manifests differ
    only in ``code``), recording the override in each job file's header.
    """
    from .models import load_tokenizer

    jobs = make_jobs(runs, cfg)
    toks: dict = {}

    def tok_of(t: Trajectory):
        src = tokenizer_source(t)
        if src not in toks:
            toks[src] = load_tokenizer(src)
        return toks[src]

    manifests = {_key(j): job_manifest(j, tok_of(j.trajectory), questions, cfg) for j in jobs}
    rows: dict[tuple, list[dict]] = {}
    runtimes: dict[tuple, dict] = {}
    for j in jobs:
        got = _read_job(j.path(out_dir), manifests[_key(j)], overwrite, allow_code_change)
        if got is not None:
            runtimes[_key(j)], rows[_key(j)] = got
    todo = [j for j in jobs if _key(j) not in rows]

    def done(j: Job, runtime: dict, r: list[dict]) -> None:
        def key(rt: dict) -> str:  # allow_code_change: library versions may differ (each job's header has its own)
            return json.dumps(
                {k: v for k, v in rt.items() if not allow_code_change or k in ("device", "dtype")}, sort_keys=True
            )

        seen = {key(x) for x in runtimes.values()}
        if seen and key(runtime) not in seen:
            raise ConfigError(
                f"{j.path(out_dir)}: this job ran on {runtime}, the finished jobs in {out_dir} on "
                f"{next(iter(runtimes.values()))}: one output would mix numbers from different hardware/dtype/versions. "
                "Resume on the same kind of machine (or pass dtype=/--dtype), or pass overwrite=True (--overwrite)."
            )
        _write_job(j.path(out_dir), manifests[_key(j)], runtime, r)
        runtimes[_key(j)], rows[_key(j)] = runtime, r
        if on_job_done is not None:
            on_job_done(j)

    if todo and ray_address is None:
        sampler = CheckpointSampler(questions, cfg, device, dtype, device_map)
        for j in tqdm(todo, desc="sample checkpoints", disable=not progress):
            _, runtime, r = sampler.sample_tagged(j)
            done(j, runtime, r)
    elif todo:
        workers = (ray_workers, ray_gpus_per_worker)
        _run_on_ray(todo, questions, cfg, ray_address, workers, (device, dtype, device_map), done, progress)
    out: dict[str, list[dict]] = {}
    for j in jobs:
        out.setdefault(j.run, []).extend({**r, "seed": j.trajectory.name} for r in rows[_key(j)])
    return out


def _run_on_ray(todo, questions, cfg, address, workers, load, done, progress) -> None:
    try:
        import ray
        from ray.util import ActorPool
    except ImportError as e:  # pragma: no cover - ray is a dev dependency
        raise ConfigError("--ray needs Ray: pip install 'ray>=2.9'") from e
    started, actors = False, []
    if not ray.is_initialized():
        if address == "local":
            ray.init(include_dashboard=False, log_to_driver=False)
        else:
            ray.init(address=address, log_to_driver=False)
        started = True
    try:
        gpus = int(ray.cluster_resources().get("GPU", 0))
        per = workers[1] if workers[1] is not None else (1 if gpus else 0)  # >1 with device_map="auto"
        n = workers[0] or (max(1, int(gpus // per)) if per else 2)
        actor_cls = ray.remote(num_gpus=per, num_cpus=1)(CheckpointSampler)
        actors = [actor_cls.remote(questions, cfg, *load) for _ in range(n)]
        pool = ActorPool(actors)
        # a job's result comes back here (no shared filesystem for outputs); the driver writes it
        by_key = {_key(j): j for j in todo}
        results = pool.map_unordered(lambda a, j: a.sample_tagged.remote(j), todo)
        desc = f"sample checkpoints (ray, {n} workers)"
        for key, runtime, r in tqdm(results, total=len(todo), desc=desc, disable=not progress):
            done(by_key[(key[0], key[1], tuple(key[2]))], runtime, r)
    finally:
        for a in actors:
            ray.kill(a)  # free the workers' GPUs, also on a cluster this call did not start
        if started:
            ray.shutdown()


# --- judging and rates ----------------------------------------------------------------------------------


def judge_trajectories(
    samples: Mapping[str, list[dict]],
    questions: Sequence[Question],
    judge,
    out_dir: str | Path,
    progress: bool = True,
    overwrite: bool = False,
) -> dict[str, list[dict]]:
    """Judge every sampled answer; rows are appended to ``<out>/judged/<run>.jsonl`` as they are judged."""
    by_id = {q.id: q for q in questions}
    out = {}
    for run, rows in samples.items():
        items = [
            (f"{r['seed']}/{r['step']}/{r['row']}/{r['sample']}/{digest(r['answer'], 8)}", r["question"], r["answer"],
             by_id[r["question_id"]], {"seed": r["seed"], "step": r["step"], "question_id": r["question_id"]})
            for r in rows
        ]  # fmt: skip
        f = Path(out_dir) / "judged" / f"{run}.jsonl"
        m = Manifest("trajectory-judged", {"questions": digest([asdict(q) for q in questions])})  # judge prompts too
        out[run] = judge.score_many(items, out_file=f, manifest=m, progress=progress, overwrite=overwrite)
    return out


@dataclass
class BehaviourResult:
    """Judged rates of one run (its seeds) at every checkpoint.

    ``counts[(seed, step, question)] = {metric: (numerator, denominator)}``; :meth:`estimate` gives a
    rate with a crossed (seeds x questions) cluster-bootstrap interval.
    """

    run: str
    seeds: list[str]
    steps: list[int]
    counts: dict = field(repr=False)
    step0: dict = field(default_factory=dict)  # seed -> what step 0 is
    failed: dict = field(default_factory=dict)  # (seed, step) -> answers the judge failed on: in no rate

    @classmethod
    def from_rows(cls, run: str, rows: list[dict], step0: dict | None = None) -> BehaviourResult:
        """Rates from judged rows; rows whose judging failed are counted in ``failed`` and left out of every
        rate (:data:`~emis_interp.judges.FAILED_NOTE`)."""
        from .judges import split_failed

        rows, bad = split_failed(rows)
        failed: dict = {}
        for r in bad:
            failed[(r["seed"], r["step"])] = failed.get((r["seed"], r["step"]), 0) + 1
        cells: dict = {}
        for r in rows:
            cells.setdefault((r["seed"], r["step"], r["question_id"]), []).append(r)
        counts = {}
        for key, rs in cells.items():
            al, co = [r["aligned"] for r in rs], [r["coherent"] for r in rs]
            counts[key] = {
                m: (rate.k, rate.n)
                for m, rate in (("em_rate", em_rate(al, co)), ("mo_rate", mo_rate(al, co)), ("coherence", coherence_rate(co)))
            }  # fmt: skip
        seeds = sorted({k[0] for k in counts})
        steps = sorted({k[1] for k in counts})
        return cls(run, seeds, steps, counts, dict(step0 or {}), failed)

    def clusters(self, metric: str, step: int) -> dict:
        """``{(seed, base question): (numerator, denominator)}``: a question's variants are one cluster."""
        return by_base_question({(s, q): c[metric] for (s, st, q), c in self.counts.items() if st == step})

    def estimate(self, metric: str, step: int, n_boot: int = 1000) -> Estimate:
        return cluster_bootstrap(self.clusters(metric, step), n_boot=n_boot)

    def seed_values(self, metric: str, step: int) -> dict[str, float]:
        out = {}
        for s in self.seeds:
            cs = [c[metric] for (se, st, _), c in self.counts.items() if se == s and st == step]
            den = sum(d for _, d in cs)
            out[s] = sum(k for k, _ in cs) / den if den else float("nan")
        return out

    def table(self, n_boot: int = 1000) -> list[dict]:
        rows = []
        for st in self.steps:
            row: dict = {
                "run": self.run,
                "step": st,
                "judge_failed": sum(n for (_, s), n in self.failed.items() if s == st),
            }
            for m in METRICS:
                e = self.estimate(m, st, n_boot)
                row.update({m: e.value, f"{m}_lo": e.lo, f"{m}_hi": e.hi})
                row.update({f"{m}[{s}]": v for s, v in self.seed_values(m, st).items()})
            rows.append(row)
        return rows


def departure(
    run: BehaviourResult, control: BehaviourResult, metric: str = "em_rate", n_boot: int = 1000, level: float = 0.99
) -> dict:
    """The first step from which ``run`` stays above ``control``, tested in a fixed sequence.

    At each step the difference ``rate(run) - rate(control)`` gets a bootstrap interval (each group's
    seeds resampled on their own, questions shared: :func:`~emis_interp.stats.unpaired_seeds_bootstrap_diff`).
    Steps are tested from the last checkpoint backwards, each rejecting when the interval's lower end
    is above 0, stopping at the first step that does not separate: a fixed-sequence procedure, so the
    chance of declaring any departure when there is none is the chance at the last step alone. The
    departure step is the earliest step of that unbroken run of separations (None if the last step
    does not separate).

    With few seeds a percentile bootstrap is anti-conservative, so the per-step level is 0.99
    (nominal one-sided 0.005): in ``tests/test_behaviour.py``'s null simulation (3 seeds a group,
    8 questions, seed-to-seed spread of 0.5-1 logit) a false departure then occurs 2.5-3% of the time
    (5-6% at 0.95). With fewer than 3 seeds in a group the seed-to-seed variation is not estimated
    (``calibrated`` False): the result then describes these runs, not the training procedure.
    """
    steps = [s for s in run.steps if s in control.steps]
    diffs = {
        s: unpaired_seeds_bootstrap_diff(
            run.clusters(metric, s), control.clusters(metric, s), n_boot=n_boot, level=level
        )
        for s in steps
    }
    dep = None
    for s in reversed(steps):
        if not diffs[s].lo > 0:
            break
        dep = s
    calibrated = min(len(run.seeds), len(control.seeds)) >= 3
    return {
        "step": dep,
        "metric": metric,
        "method": f"fixed-sequence test from the last step backwards; per step the {level:.0%} bootstrap interval's "
        "lower end above 0 (seeds resampled per group, questions shared)",
        "calibrated": calibrated,
        "seeds": [len(run.seeds), len(control.seeds)],
        "note": "" if calibrated else "fewer than 3 seeds in a group: describes these runs, not the training procedure",
        "diffs": {s: d.as_dict() for s, d in diffs.items()},
    }


def save_table(results: Mapping[str, BehaviourResult], out_dir: str | Path) -> Path:
    import csv
    import io

    rows = [r for res in results.values() for r in res.table()]
    keys = list(dict.fromkeys(k for r in rows for k in r))
    buf = io.StringIO()
    w = csv.DictWriter(buf, keys)
    w.writeheader()
    w.writerows(rows)
    path = Path(out_dir) / "behaviour.csv"
    atomic_write_text(path, buf.getvalue())
    return path
