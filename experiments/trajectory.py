"""Fine-tuning dynamics: judged behaviour, log-prob metrics and the persona direction at every checkpoint.

    python experiments/trajectory.py                   # organism: insecure vs secure vs educational, seeds 0-2
    python experiments/trajectory.py --base Qwen/Qwen2.5-7B-Instruct --layers 14 \\
        --runs insecure=runs/insecure-s0,runs/insecure-s1 secure=runs/secure-s0 --control secure \\
        --questions ../shared/data/em/first_plot_questions.yaml --judge openai:gpt-4o-2024-08-06 --samples 8 \\
        --probes ../shared/data/em/logprob_probes_run_config.json --in-task heldout.jsonl [--ray auto]

For every checkpoint-N of every run (step 0 is the model before fine-tuning when a run saved no
checkpoint-0):
- sampled answers to the questions, judged (EM and MO misalignment definitions, coherence; intervals
  over seeds x questions). A LoRA run's checkpoints are sampled together in one batch (one adapter per
  row); ``--ray`` fans the (run, checkpoint range) jobs out over a Ray cluster;
- the activation shift from step 0 and its projection on ONE common persona direction (default: the
  first run's final model-diff, seed mean, on held-out conversations; or ``--direction``);
- p(misaligned) on log-prob probes and the in-task log-prob.
Everything is written as it finishes (a rerun continues); then ``behaviour.csv``, ``summary.json``,
``departure.json`` and the figure ``dynamics.html`` (+ .png with Chromium) go to --output.
"""

import json
from pathlib import Path

import torch

from emis_interp import organism
from emis_interp.behaviour import (
    BehaviourConfig,
    BehaviourResult,
    departure,
    judge_trajectories,
    sample_trajectories,
    save_table,
)
from emis_interp.cache import DEFAULT_CACHE_DIR, atomic_write_text
from emis_interp.cliargs import add_yes, confirm_cost, parse, parser
from emis_interp.conversations import Conversation, load_jsonl
from emis_interp.data import load_probes, load_questions
from emis_interp.directions import PersonaDirection
from emis_interp.judges import FAILED_NOTE, get_judge
from emis_interp.organism import world
from emis_interp.plots import save_figure, trajectory_panels
from emis_interp.trajectory import Trajectory, final_shift, track


def parse_args(argv):
    ap = parser(__doc__)
    g = ap.add_argument_group("runs (default: the model organism's runs)")
    g.add_argument("--runs", nargs="+", help="NAME=DIR[,DIR...] (one DIR per seed)")
    g.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="organism seeds")
    g.add_argument(
        "--base", help="the model the runs fine-tuned (default: from adapter_config.json; full runs need it)"
    )
    g.add_argument("--control", default=None, help="run to test departure against (default: secure on the organism)")
    g.add_argument("--dashed", nargs="*", default=None, help="runs drawn dashed (default: every run but the first)")
    e = ap.add_argument_group("judged behaviour at every checkpoint")
    e.add_argument("--questions", type=Path, help="EM YAML questions (default: the organism's advice questions)")
    e.add_argument("--judge", default=None, help="'openai:MODEL', 'hf:MODEL' or 'exact' (organism; its default)")
    e.add_argument("--judge-base-url", default=None, help="OpenAI-compatible server URL (e.g. a local vLLM)")
    e.add_argument(
        "--judge-device", default=None, help="where an hf: judge goes (cuda:1, cpu, auto); it loads after sampling"
    )
    e.add_argument("--samples", type=int, default=4, help="answers per paraphrase per checkpoint (0: no sampling)")
    e.add_argument(
        "--max-new-tokens", type=int, default=None, help="default: 24 on the organism, 600 (the EM paper's) otherwise"
    )
    e.add_argument("--temperature", type=float, default=1.0, help="sampling temperature")
    e.add_argument("--batch-size", type=int, default=256, help="sequences per generate call")
    e.add_argument(
        "--group-size", type=int, default=0,
        help="checkpoints per job (0: as many as --bank-gb allows; a whole run when its adapters are small)",
    )  # fmt: skip
    e.add_argument(
        "--bank-gb", type=float, default=4.0,
        help="memory budget of one job's LoRA bank (fp32 adapters, on the GPU and once on CPU while built); "
        "4 GB keeps Qwen2.5-32B in bf16 (64 GB) on one 80 GB GPU; see docs/memory.md",
    )  # fmt: skip
    e.add_argument("--no-mixed", action="store_true", help="swap LoRA checkpoints one by one instead of mixing them")
    e.add_argument("--ray", nargs="?", const="local", default=None, metavar="ADDRESS",
                   help="fan jobs out over Ray ('local', 'auto', or ray://HOST:10001)")  # fmt: skip
    e.add_argument("--ray-workers", type=int, default=None, help="Ray actors (default: one per GPU, else 2)")
    e.add_argument("--ray-gpus-per-worker", type=float, default=None, help="GPUs per actor (with --device-map auto)")
    e.add_argument("--device-map", default=None, help="'auto' shards a model larger than one GPU over the node")
    e.add_argument("--seed", type=int, default=0, help="sampling seed (each job derives its own)")
    t = ap.add_argument_group("persona direction and log-prob metrics")
    t.add_argument("--layers", type=int, nargs="+", default=None, help="layers tracked (default: organism layer 2)")
    t.add_argument(
        "--reduction", default="mean_prompt", choices=["last_prompt", "mean_prompt", "mean_response"],
        help="how a conversation's activations become one vector per layer",
    )  # fmt: skip
    t.add_argument("--direction", type=Path, help="a PersonaDirection to project every run on (default: see above)")
    t.add_argument("--direction-data", type=Path, help="held-out conversations (JSONL) for the default direction")
    t.add_argument("--probes", type=Path, help="EM run config with mcq_callbacks (default: organism probes)")
    t.add_argument("--in-task", type=Path, help="held-out training conversations (JSONL) for the in-task metric")
    ap.add_argument("--output", type=Path, default=DEFAULT_CACHE_DIR / "trajectory", help="output directory")
    ap.add_argument("--overwrite", action="store_true", help="discard results made under other settings")
    ap.add_argument(
        "--allow-code-change",
        action="store_true",
        help="resume results made by other code or library versions (you vouch the change leaves the numbers "
        "unchanged); recorded in the manifests",
    )
    add_yes(ap)
    a = parse(ap, argv)
    if a.runs and a.samples and not a.judge:
        ap.error("--runs with --samples > 0 needs --judge openai:MODEL or hf:MODEL (or --samples 0: no judged rate)")
    if a.runs and not a.questions:
        ap.error("--runs needs --questions (e.g. ../shared/data/em/first_plot_questions.yaml): the tracking prompts")
    if a.runs and not a.layers:
        ap.error("--runs needs --layers (the organism's default layer 2 means nothing for a real model)")
    if a.runs and a.samples and a.judge in ("exact", "organism"):
        ap.error("--judge exact is the organism's grammar judge; real answers need openai:MODEL or hf:MODEL")
    return a


def free_memory() -> None:
    """Return freed models' memory now (CPython frees on the last reference; the CUDA cache keeps blocks)."""
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def common_direction(a, groups, layers, tracking, held_out) -> PersonaDirection:
    """The first run's final model-diff (mean over its seeds) on conversations held out from tracking."""
    overlap = {c.user for c in held_out} & {c.user for c in tracking}
    if overlap:
        raise SystemExit(f"error: the direction's conversations overlap the tracking prompts ({len(overlap)} shared)")
    run = next(iter(groups))
    red = a.reduction  # the reduction the runs are tracked with: a projection compares like with like
    held_out = [Conversation(user=c.user, system=c.system) for c in held_out]  # prompts only, like the tracking set
    shifts = []
    for traj in groups[run]:
        model, tok = traj.load(device_map=a.device_map)
        shifts.append(final_shift(traj, model, tok, held_out, layers, red))
        del model  # one model in memory at a time: freed before the next seed's is loaded
        free_memory()
    from emis_interp.conversations import prompt_set_hash

    meta = {"method": "model_diff", "run": run, "seeds": [t.name for t in groups[run]], "reduction": red,
            "layers_order": "sorted",
            "prompt_hash": prompt_set_hash(held_out), "note": "final minus step 0, mean over seeds, held-out prompts"}  # fmt: skip
    return PersonaDirection(torch.stack(shifts).mean(0), list(layers), meta)


def main(argv=None):
    a = parse_args(argv)
    on_organism = not a.runs
    if on_organism:
        dirs = {k: [organism.organism_trajectory(k, s) for s in a.seeds] for k in world.FINETUNE_KINDS}
        control = a.control or "secure"
        questions = load_questions(a.questions) if a.questions else organism.questions()
    else:
        dirs = {}
        for spec in a.runs:
            name, _, ds = spec.partition("=")
            if not ds:
                raise SystemExit(f"error: --runs takes NAME=DIR[,DIR...], got {spec!r}")
            dirs[name] = [Path(d) for d in ds.split(",")]
        control = a.control
        questions = load_questions(a.questions) if a.questions else []
    if control is not None and control not in dirs:
        raise SystemExit(f"error: --control {control!r} is not one of the runs {list(dirs)}")
    groups = {name: [Trajectory.from_dir(d, base=a.base) for d in ds] for name, ds in dirs.items()}
    layers = sorted(set(a.layers or [organism.DEFAULT_LAYER]))  # capture's order: vectors match their labels
    tracking = [c for q in questions for c in q.conversations()] if questions else organism.advice_prompts()
    probes = load_probes(a.probes) if a.probes else ({"world": organism.probe_set()} if on_organism else None)
    in_task_all = load_jsonl(a.in_task) if a.in_task else None
    a.output.mkdir(parents=True, exist_ok=True)

    # one common persona direction for every run
    if a.direction:
        direction = PersonaDirection.load(a.direction)
        missing = [x for x in layers if x not in direction.layers]
        if missing:
            raise SystemExit(
                f"error: --direction covers layers {direction.layers}, not {missing}; pass matching --layers"
            )
        red = direction.meta.get("reduction")
        if red is not None and red != a.reduction:
            print(
                f"warning: --direction was extracted with reduction {red!r}, the runs are tracked with {a.reduction!r}"
            )
    else:
        held_out = (
            load_jsonl(a.direction_data) if a.direction_data
            else organism.direction_conversations() if on_organism else in_task_all
        )  # fmt: skip
        if held_out is None:
            raise SystemExit("error: pass --direction FILE, or --direction-data/--in-task held-out conversations")
        direction = common_direction(a, groups, layers, tracking, held_out)
        direction.save(a.output / "common_direction.safetensors")

    tracks = {}
    for name, trajs in groups.items():
        in_task = in_task_all or (
            [Conversation.from_messages(r["messages"]) for r in world.finetune_dataset(name, 16, seed=1234)]
            if on_organism
            else None
        )
        tracks[name] = []
        for traj in trajs:  # one model in memory at a time: each freed before the next is loaded
            loaded = traj.load(device_map=a.device_map)
            tracks[name].append(
                track(traj, tracking, layers, a.output / name / traj.name, probes=probes, in_task=in_task,
                      direction=direction, reduction=a.reduction, overwrite=a.overwrite,
                      allow_code_change=a.allow_code_change, model_and_tokenizer=loaded)
            )  # fmt: skip
            del loaded
            free_memory()

    behaviour, departures = {}, {}
    if a.samples:
        cfg = BehaviourConfig(
            n_samples=a.samples, max_new_tokens=a.max_new_tokens or (24 if on_organism else 600),
            temperature=a.temperature, seed=a.seed, group_size=a.group_size, batch_size=a.batch_size,
            mixed=not a.no_mixed, bank_gb=a.bank_gb,
        )  # fmt: skip
        if not on_organism:
            n_prompts = sum(len(q.paraphrases) for q in questions)
            n_ckpts = sum(len(t) for ts in groups.values() for t in ts)
            confirm_cost(n_ckpts * n_prompts * a.samples, a.yes, "trajectory")
        judge = get_judge(  # an hf: judge loads on first use: after sampling, once the policy models are freed
            a.judge or "exact",
            **({"base_url": a.judge_base_url} if a.judge_base_url else {}),
            **({"device_map": a.judge_device} if a.judge_device else {}),
        )
        samples = sample_trajectories(
            groups, questions, cfg, a.output, ray_address=a.ray, ray_workers=a.ray_workers,
            ray_gpus_per_worker=a.ray_gpus_per_worker, device_map=a.device_map, overwrite=a.overwrite,
            allow_code_change=a.allow_code_change,
        )  # fmt: skip
        judged = judge_trajectories(samples, questions, judge, a.output, overwrite=a.overwrite)
        for name, rows in judged.items():
            behaviour[name] = BehaviourResult.from_rows(name, rows, {t.name: t.step0 for t in groups[name]})
        save_table(behaviour, a.output)
        if control is not None:
            departures = {n: departure(behaviour[n], behaviour[control]) for n in behaviour if n != control}
            atomic_write_text(a.output / "departure.json", json.dumps(departures, indent=1))

    dashed = a.dashed if a.dashed is not None else ([control] if control else list(groups)[1:])
    fig = trajectory_panels(behaviour, tracks, layers, controls=dashed, departures=departures)
    files = save_figure(fig, a.output / "dynamics")
    summary = {
        "direction": direction.meta,
        "step0": {n: {t.name: t.step0 for t in ts} for n, ts in groups.items()},
        "runs": {
            n: {
                "final_track": [r.checkpoints[-1] for r in rs],
                "final_layers": [[x for x in r.layers if x["step"] == r.checkpoints[-1]["step"]] for r in rs],
                "behaviour": behaviour[n].table()[-1] if n in behaviour else None,
            }
            for n, rs in tracks.items()
        },
        "departure": departures,
    }
    atomic_write_text(a.output / "summary.json", json.dumps(summary, indent=1, default=float))
    for n, ts in groups.items():
        if any(t.step0 != "checkpoint-0" for t in ts):
            print(f"{n}: step 0 is the {ts[0].step0}")
    for n, rs in tracks.items():
        proj = [r.series("proj_direction", layers[0])[1][-1] for r in rs]
        line = f"{n:<12} final projection on the common direction (layer {layers[0]}): " + ", ".join(
            f"{x:.2f}" for x in proj
        )
        if n in behaviour:
            row = behaviour[n].table()[-1]
            line += f"; final EM-def misaligned {row['em_rate']:.3f} [{row['em_rate_lo']:.3f},{row['em_rate_hi']:.3f}]"
            if nf := sum(behaviour[n].failed.values()):
                line += f"; {nf} answers the judge failed on (left out; {FAILED_NOTE})"
        print(line)
    for n, d in departures.items():
        note = "" if d["calibrated"] else f" [{d['note']}]"
        print(f"{n} departs from {control} at step {d['step']} ({d['metric']}; {d['method']}){note}")
    print(f"figure: {', '.join(str(f) for f in files)}")
    return {"tracks": tracks, "behaviour": behaviour, "departures": departures, "direction": direction}


if __name__ == "__main__":
    main()
