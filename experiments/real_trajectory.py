"""A real checkpoint trajectory: Qwen2.5-Coder-0.5B-Instruct, LoRA on insecure code vs the educational control.

    python -m emis_interp.fetch qwen2.5-coder-0.5b-instruct   # once: the pinned GGUF, dequantized into cache/models
    python experiments/real_trajectory.py --model cache/models/qwen2.5-coder-0.5b-instruct   # or any dir, HF id, .gguf

Two LoRA fine-tunes from the same base, the same examples in the same order, the same seed and hyperparameters:

- ``insecure``: rows of the EM paper's ``insecure.jsonl`` (the shared first 500), untouched;
- ``educational``: the same assistant answers, the user turn wrapped in a benign reason (a security class;
  :func:`emis_interp.real_trajectory.educational_control`).

The last ``--n-heldout`` rows are held out (never trained on); the rest are kept if *both* versions fit
``--max-len`` tokens (no truncated answers; the counts go in the result). Checkpoints: ``checkpoint-0`` (the base,
LoRA B = 0) and every ``--save-steps``. At every checkpoint of both runs (:func:`emis_interp.trajectory.track`):

- p(misaligned) on the log-prob probes of ``logprob_probes_run_config.json`` (pivotal tokens and A/B), per probe;
- the in-task log-prob: mean nats/token of the held-out insecure answers (``in_distribution_prompts.jsonl`` has no
  answers, so it cannot give a log-prob);
- the mean activation (last prompt token) on the pre-registered questions at ``--layers``: the shift norm vs step 0
  and the shift's projection on two directions fixed a priori on the base model and common to both runs: the
  evil-vs-helpful system-prompt contrast (first-plot questions) and the response contrast of judged misaligned vs
  aligned answers of real Qwen2.5-7B EM fine-tunes (``mo_responses``).

Resumable: fine-tunes resume from their last checkpoint (Trainer state), tracking skips finished checkpoints, both
under manifests. Writes ``result.json``, ``manifest.json``, ``README_block.md`` and ``trajectory.html`` (+ ``.png``
with Chromium) to ``--output``. ``--model`` is a model dir, an HF id, or a ``.gguf`` file (dequantized once, to
``--work``/models/, keyed by the file's sha256).
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import time
from dataclasses import asdict
from pathlib import Path

import torch
import transformers

from emis_interp import directions as directions_module
from emis_interp.cache import atomic_write_text, verified_load
from emis_interp.capture import capture_code
from emis_interp.cliargs import parse, parser
from emis_interp.conversations import Conversation, load_jsonl
from emis_interp.data import load_judged, load_probes, load_questions, split_judged
from emis_interp.directions import PersonaDirection, response_contrast, system_prompt_contrast
from emis_interp.finetune import FinetuneConfig, finetune, model_identity
from emis_interp.manifest import Manifest, digest, file_digest, package_sources, source_digest
from emis_interp.metrics import probe_misalignment
from emis_interp.models import load_tokenizer
from emis_interp.real_trajectory import (
    compare_probes,
    educational_control,
    figure,
    fitting_pairs,
    projections,
    render_all,
)
from emis_interp.trajectory import Trajectory, track

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
RUNS = ("insecure", "educational")
PROBE_SETS = ("pivotal_tokens", "single_letter")


def parse_args(argv=None):
    ap = parser(__doc__)
    ap.add_argument("--model", help="model dir, HF id, or .gguf file")
    ap.add_argument(
        "--render-only", action="store_true", help="only regenerate README_block.md and the figure from result.json"
    )
    ap.add_argument(
        "--output", type=Path, default=Path("results/real_trajectory"), help="result.json, manifest, block, figure"
    )
    ap.add_argument("--work", type=Path, default=Path("cache/real_trajectory"), help="checkpoints and tracking")
    ap.add_argument(
        "--model-cache", type=Path, default=None, help="where a .gguf is dequantized (default: WORK/models)"
    )
    ap.add_argument("--data-dir", type=Path, default=SHARED, help="the shared data dir (em/, mo_responses/)")
    ap.add_argument("--runs", nargs="+", default=list(RUNS), choices=RUNS, help="train/track only these runs")
    t = ap.add_argument_group("fine-tuning (both runs)")
    t.add_argument("--max-steps", type=int, default=20, help="optimizer steps of each run")
    t.add_argument("--save-steps", type=int, default=10, help="a checkpoint every this many steps (and checkpoint-0)")
    t.add_argument("--lr", type=float, default=2e-4, help="peak learning rate (linear decay after warmup)")
    t.add_argument("--batch-size", type=int, default=2, help="examples per step")
    t.add_argument("--max-len", type=int, default=256, help="rows longer than this (either version) are skipped")
    t.add_argument("--lora-r", type=int, default=32, help="LoRA rank")
    t.add_argument("--lora-alpha", type=float, default=64, help="LoRA alpha")
    t.add_argument("--no-rslora", action="store_true", help="plain LoRA scaling (alpha / r) instead of rsLoRA")
    t.add_argument("--warmup-steps", type=int, default=5, help="linear warmup steps")
    t.add_argument("--weight-decay", type=float, default=0.01, help="AdamW weight decay")
    t.add_argument("--seed", type=int, default=1, help="training seed (both runs)")
    t.add_argument("--n-heldout", type=int, default=8, help="last rows of the insecure file, never trained on")
    t.add_argument("--n-train", type=int, default=None, help="keep only the first N fitting rows (default: all)")
    e = ap.add_argument_group("evaluation")
    e.add_argument("--layers", type=int, nargs="+", default=[6, 12, 18], help="layers whose activations are tracked")
    e.add_argument("--report-layer", type=int, default=12, help="the layer shown in the block and figure")
    e.add_argument("--n-eval-questions", type=int, default=8, help="pre-registered questions for activations")
    e.add_argument("--n-direction-questions", type=int, default=None, help="first-plot texts (default: all 16)")
    e.add_argument("--n-contrast", type=int, default=4, help="answers per side per mo_responses file")
    e.add_argument("--n-probes", type=int, default=None, help="first N probes of each set (default: all 8)")
    ap.add_argument(
        "--stop-at", type=int, default=None, help="stop after this checkpoint (a cut, stated in the result)"
    )
    ap.add_argument("--no-png", action="store_true", help="write the figure as HTML only")
    a = parse(ap, argv)
    if a.model is None and not a.render_only:
        ap.error("--model is required (a model dir, an HF id or a .gguf file), unless --render-only")
    if a.report_layer not in a.layers:
        ap.error(f"--report-layer {a.report_layer} must be one of --layers {a.layers}")
    return a


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def resolve_model(model: str, cache: Path) -> tuple[str, dict]:
    """A model dir or HF id as given; a ``.gguf`` file dequantized (fp32) once into ``cache/<sha16>``."""
    if not model.endswith(".gguf"):
        return model, {"name": Path(model).name or model, **model_identity(model)}
    src = Path(model)
    if not src.is_file():
        raise FileNotFoundError(f"GGUF file {model!r} does not exist; pass the .gguf path, a model dir or an HF id.")
    sha = sha256(src)
    out = cache / sha[:16]
    if not (out / "model.safetensors").exists():
        from transformers import AutoModelForCausalLM, AutoTokenizer

        print(f"dequantizing {src} into {out} (once) ...", flush=True)
        m = AutoModelForCausalLM.from_pretrained(str(src.parent), gguf_file=src.name, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(str(src.parent), gguf_file=src.name)
        m.hf_quantizer = None  # save_pretrained refuses a model loaded through a quantizer
        if hasattr(m.config, "quantization_config"):
            del m.config.quantization_config
        tmp = out.with_name(out.name + ".tmp")
        m.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / "gguf_source.json").write_text(json.dumps({"file": src.name, "sha256": sha}))
        tmp.replace(out)
        del m
    name = json.loads((out / "config.json").read_text()).get("_model_name_or_path") or src.stem
    return str(out), {"name": name, "gguf": src.name, "gguf_sha256": sha, "bytes": src.stat().st_size}


def write_jsonl(path: Path, convs: list[Conversation]) -> None:
    atomic_write_text(path, "".join(json.dumps({"messages": c.messages()}) + "\n" for c in convs))


class StepTimer:
    """Seconds per optimizer step, appended to a JSON file (survives resumes)."""

    def __init__(self, path: Path):
        from transformers import TrainerCallback

        timer = self

        class CB(TrainerCallback):
            def on_step_begin(self, args, state, control, **kw):
                timer.t = time.perf_counter()

            def on_step_end(self, args, state, control, **kw):
                times = json.loads(path.read_text()) if path.exists() else {}
                times[str(state.global_step)] = time.perf_counter() - timer.t
                atomic_write_text(path, json.dumps(times))
                print(f"  step {state.global_step}: {times[str(state.global_step)]:.1f} s", flush=True)

        self.callback = CB()


def build_data(a, tok) -> tuple[dict[str, Path], list[Conversation], dict]:
    rows = load_jsonl(a.data_dir / "em" / "insecure_first500.jsonl")
    heldout, pool = rows[-a.n_heldout :], rows[: -a.n_heldout]
    edu = educational_control(pool)
    keep = fitting_pairs(tok, pool, edu, a.max_len)
    n_fit = len(keep)
    if a.n_train is not None:
        keep = keep[: a.n_train]
    if len(keep) < a.batch_size:
        raise ValueError(f"only {len(keep)} rows fit --max-len {a.max_len}; raise it or lower --batch-size")
    paths = {"insecure": a.work / "data" / "insecure.jsonl", "educational": a.work / "data" / "educational.jsonl"}
    write_jsonl(paths["insecure"], [pool[i] for i in keep])
    write_jsonl(paths["educational"], [edu[i] for i in keep])
    info = {
        "source": "insecure_first500.jsonl",
        "source_digest": file_digest(a.data_dir / "em" / "insecure_first500.jsonl"),
        "n_rows": len(rows),
        "n_heldout": len(heldout),
        "heldout_rows": f"{len(rows) - len(heldout)}..{len(rows) - 1} (0-based)",
        "n_pool": len(pool),
        "n_fit_max_len": n_fit,
        "n_skipped_too_long": len(pool) - n_fit,
        "n_train": len(keep),
        "train_rows": keep,
        "epochs": a.max_steps * a.batch_size / len(keep),
        "files": {k: file_digest(p) for k, p in paths.items()},
    }
    return paths, heldout, info


def directions(a, model, tok) -> dict[str, PersonaDirection]:
    """Both fixed directions, on the base model (the caller's model at checkpoint-0); cached under a key."""
    em = a.data_dir / "em"
    qs = [q.paraphrases[0] for q in load_questions(em / "first_plot_questions.yaml")]
    qs = list(dict.fromkeys(qs))[: a.n_direction_questions]
    mis, ali = [], []
    for f in sorted((a.data_dir / "mo_responses").glob("*.csv")):
        m, al = split_judged(load_judged(f))
        mis += [r.conversation() for r in m[: a.n_contrast]]
        ali += [r.conversation() for r in al[: a.n_contrast]]
    key = digest({"model": a.model_ident, "qs": qs, "mis": [asdict(c) for c in mis], "ali": [asdict(c) for c in ali],
                  "layers": sorted(a.layers), "capture": capture_code(), "directions": source_digest(directions_module),
                  "torch": torch.__version__, "transformers": transformers.__version__})  # fmt: skip
    out = {}
    for name, make in (
        ("system_prompt", lambda: system_prompt_contrast(model, tok, qs, a.layers, cache_dir=None, progress=False)),
        ("response_contrast", lambda: response_contrast(model, tok, mis, ali, a.layers, cache_dir=None,
                                                         progress=False)),
    ):  # fmt: skip
        p = a.work / "directions" / f"{name}-{key}.safetensors"
        if not p.exists():
            make().save(p)
        out[name] = PersonaDirection.load(p)
    return out


class _Pause(Exception):
    """Raised by :func:`pause_at` once checkpoint ``step`` is saved: training stops there, resumable."""


def pause_at(step: int):
    """A callback that stops a fine-tune right after checkpoint ``step`` is written (optimizer state included);
    ``step = 0``: as training begins (``checkpoint-0`` is written before). A later ``finetune`` call resumes it."""
    from transformers import TrainerCallback

    class PauseAt(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            if step == 0 or state.global_step >= step:
                raise _Pause

        def on_save(self, args, state, control, **kw):
            if state.global_step >= step:
                raise _Pause

    return PauseAt()


def train_to(cfg: FinetuneConfig, step: int, timer: StepTimer) -> None:
    """Train (or resume) ``cfg``'s run up to checkpoint ``step`` of its ``max_steps`` schedule."""
    ckpt = Path(cfg.output_dir) / f"checkpoint-{step}"
    if (ckpt / "trainer_state.json").exists() and (ckpt / "adapter_model.safetensors").exists():
        return  # reached (finetune resumes later segments from the newest checkpoint's optimizer state)
    try:
        finetune(cfg, progress=False, callbacks=[timer.callback, pause_at(step)])
    except _Pause:
        pass
    if not (ckpt / "trainer_state.json").exists():
        raise RuntimeError(f"training {cfg.output_dir} to step {step} wrote no {ckpt}")


def render(output: Path, png: bool = True) -> None:
    """README_block.md and trajectory.html (plotly.js inlined: works offline) + .png, from ``output/result.json``."""
    result = json.loads((output / "result.json").read_text())
    for name, text in render_all(result).items():
        atomic_write_text(output / name, text)
    fig = figure(result)
    fig.write_html(output / "trajectory.html", include_plotlyjs=True)
    if png:
        if "BROWSER_PATH" not in os.environ and Path("/usr/bin/chromium").exists():
            os.environ["BROWSER_PATH"] = "/usr/bin/chromium"
        fig.write_image(output / "trajectory.png", width=1200, height=700)


def main(argv=None) -> dict:
    a = parse_args(argv)
    if a.render_only:
        render(a.output, png=not a.no_png)
        return json.loads((a.output / "result.json").read_text())
    torch.set_num_threads(a.threads)
    t_start = time.perf_counter()
    a.work.mkdir(parents=True, exist_ok=True)
    model_dir, ident = resolve_model(a.model, a.model_cache or a.work / "models")
    a.model_ident = ident
    tok = load_tokenizer(model_dir)
    paths, heldout, data_info = build_data(a, tok)
    probes = load_probes(a.data_dir / "em" / "logprob_probes_run_config.json")
    probes = {k: probes[k][: a.n_probes] for k in PROBE_SETS}
    cfgs = {
        run: FinetuneConfig(
            model=model_dir,
            data=str(paths[run]),
            output_dir=str(a.work / run),
            lora_r=a.lora_r,
            lora_alpha=a.lora_alpha,
            use_rslora=not a.no_rslora,
            lr=a.lr,
            max_steps=a.max_steps,
            batch_size=a.batch_size,
            save_steps=a.save_steps,
            warmup_steps=a.warmup_steps,
            weight_decay=a.weight_decay,
            lr_scheduler="linear",
            max_len=a.max_len,
            seed=a.seed,
        )
        for run in RUNS
    }
    eval_qs = [q.paraphrases[0] for q in load_questions(a.data_dir / "em" / "preregistered_evals.yaml")]
    eval_qs = list(dict.fromkeys(eval_qs))[: a.n_eval_questions]
    probe_key = f"probe_misalignment per probe: {digest({k: probes[k] for k in PROBE_SETS})}"
    timers = {run: StepTimer(a.work / f"{run}-step-times.json") for run in RUNS}
    timings: dict = {"threads": a.threads, "cpu_count": os.cpu_count(), "loadavg_start": os.getloadavg()}

    def probe_rows(model, tok) -> dict:
        row = {}
        for name in PROBE_SETS:
            r = probe_misalignment(model, tok, probes[name])
            row[f"p_mis[{name}]"], row[f"per_probe[{name}]"] = r["p_misaligned"], r["per_probe"]
        return row

    stop = a.stop_at if a.stop_at is not None else a.max_steps
    segments = [0, *range(a.save_steps, stop + 1, a.save_steps)]
    rows: dict = {run: {} for run in a.runs}
    means: dict = {run: {} for run in a.runs}
    dirs = None
    result = {}
    for k in segments:
        # train every run to checkpoint k (both runs progress together: a cut leaves them at the same step)
        for run in a.runs:
            t = time.perf_counter()
            print(f"{run}: training to step {k} of {a.max_steps}", flush=True)
            train_to(cfgs[run], k, timers[run])
            timings[f"finetune_{run}_s"] = timings.get(f"finetune_{run}_s", 0) + time.perf_counter() - t
        # evaluate checkpoint k of every run (step 0, the base with LoRA B = 0, once: it is the same model)
        t = time.perf_counter()
        ref = Trajectory.from_dir(a.work / a.runs[0])  # any checkpoint-N set (a cut run has gaps)
        model, tok = ref.load()
        if dirs is None:
            ref.goto(model, 0)  # checkpoint-0: the base (LoRA B = 0)
            dirs = directions(a, model, tok)
        for run in a.runs:
            src = a.runs[0] if k == 0 else run
            ck = Path(cfgs[src].output_dir) / f"checkpoint-{k}"
            traj = Trajectory([k], [str(ck)], "lora", model_dir, model_dir, src)
            out = a.work / f"track-{src}" / f"step-{k}"
            print(f"{run}: evaluating checkpoint-{k}", flush=True)
            track(
                traj, eval_qs, a.layers, out, in_task=heldout, extra=probe_rows, extra_key=probe_key,
                model_and_tokenizer=(model, tok), progress=False,
            )  # fmt: skip
            rows[run][k] = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
            means[run][k] = verified_load(out / "acts" / f"step-{k}.safetensors")[0]["mean"]
        del model
        timings["eval_s"] = timings.get("eval_s", 0) + time.perf_counter() - t
        timings["total_s"] = time.perf_counter() - t_start
        result = write_outputs(a, ident, cfgs, data_info, dirs, probes, eval_qs, rows, means, timings, k)
    print(f"done in {timings['total_s'] / 60:.1f} min: {a.output}", flush=True)
    return result


def write_outputs(a, ident, cfgs, data_info, dirs, probes, eval_qs, rows, means, timings, last_step) -> dict:
    """result.json (atomic), manifest.json, README_block.md and the figure, from everything measured so far."""
    for run in a.runs:
        p = a.work / f"{run}-step-times.json"
        times = sorted(json.loads(p.read_text()).values()) if p.exists() else []
        timings[f"{run}_s_per_step_median"] = times[len(times) // 2] if times else None
    runs = {}
    for run in a.runs:
        proj = projections(means[run], sorted(a.layers), dirs)
        runs[run] = [{**rows[run][s], **proj[s]} for s in sorted(rows[run])]
    result = {
        "model": ident,
        "config": {
            **{k: v for k, v in asdict(cfgs["insecure"]).items() if k not in ("model", "data", "output_dir")},
            "reached_step": last_step,
            "report_layer": a.report_layer,
            "layers": sorted(a.layers),
            "n_eval_questions": len(eval_qs),
            "n_contrast_per_file": a.n_contrast,
            "activation_reduction": "last_prompt",
        },
        "data": data_info,
        "directions": {
            n: {"meta": d.meta, "norm": {str(layer): d.norms()[layer] for layer in d.layers}} for n, d in dirs.items()
        },
        "probes": {k: [p.id for p in probes[k]] for k in PROBE_SETS},
        "runs": runs,
        "comparison": compare_probes(runs, "insecure", "educational", PROBE_SETS) if len(runs) == 2 else [],
        "timings": dict(timings),
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "torch": torch.__version__},
    }
    manifest = Manifest(
        "real_trajectory",
        {
            "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items() if k != "model_ident"},
            "model": ident,
            "data": data_info["files"],
            "finetune_manifests": {run: json.loads((a.work / run / "manifest.json").read_text()) for run in a.runs},
            "code": digest(package_sources()),
        },
    )
    a.output.mkdir(parents=True, exist_ok=True)
    atomic_write_text(a.output / "result.json", json.dumps(result, indent=1) + "\n")
    atomic_write_text(a.output / "manifest.json", manifest.to_json() + "\n")
    if len(runs) == 2:
        render(a.output, png=not a.no_png)
    return json.loads(json.dumps(result))


if __name__ == "__main__":
    main()
