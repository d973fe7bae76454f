"""Building the matrix report (``cache/organism/matrix.json``): its manifest, and every section in order."""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path

from ... import organism
from ...cache import atomic_write_text
from ...finetune import list_checkpoints
from ...manifest import Manifest, cache_valid, digest, dir_digest, prepare_dir
from .config import MATRIX_FILE, RUNS, MatrixConfig, _finite, _package_state, matrix_run
from .convergence import _convergence
from .findings import _findings
from .measure import _backdoor_direction, _evaluate, _final
from .pilot import _intervention_runs, _interventions, pilot_sweep
from .screening import _screening


def report_manifest(cfg: MatrixConfig, runs: dict, pilot: dict | None = None) -> Manifest:
    """Everything that determines the matrix: config, runs, package source, shipped weights, versions,
    every run's final checkpoint and the pilot sweep's result (:func:`pilot_sweep`)."""
    finals = {f"{k}@{s}": dir_digest(list_checkpoints(d)[-1][1]) for (k, s), d in runs.items()}
    return Manifest(
        "organism_matrix",
        {
            "config": asdict(cfg),
            "runs": {k: asdict(r) for k, r in RUNS.items()},
            **_package_state(),
            "finals": finals,
            "pilot": digest(pilot),
        },
    )


def build_matrix(
    root: Path | str = organism.DEFAULT_TRAJECTORY_DIR, cfg: MatrixConfig = MatrixConfig(), overwrite: bool = False
) -> dict:
    """Compute (or reuse) the matrix report; see the module docstring. Returns the report dict."""
    import os
    import platform

    import torch

    from ...models import load_model

    root = Path(root)
    timings: dict = {}
    t = time.perf_counter()
    runs = {(name, s): matrix_run(name, s, root) for name in RUNS for s in cfg.seeds}
    timings["fine-tunes"] = time.perf_counter() - t
    t = time.perf_counter()
    pilot = pilot_sweep(root, cfg, overwrite)
    iv_runs = _intervention_runs(root, runs, cfg, pilot)
    timings["intervention fine-tunes"] = time.perf_counter() - t
    manifest = report_manifest(cfg, {**runs, **{k: v for k, v in iv_runs["dirs"].items()}}, iv_runs["pilot"])
    path = root / MATRIX_FILE
    if path.exists() and not overwrite:
        old = json.loads(path.read_text())
        if old.get("manifest") == manifest.key:
            return old
    # the report's scratch answers belong to this manifest: kept to resume a crashed build, cleared for another
    scratch = root / "matrix-runs"
    out = prepare_dir(scratch, manifest, overwrite=overwrite or not cache_valid(scratch, manifest))
    report: dict = {"manifest": manifest.key, "config": asdict(cfg)}

    def timed(name, fn, *a):
        t0 = time.perf_counter()
        r = fn(*a)
        timings[name] = time.perf_counter() - t0
        return r

    aligned, tok = load_model(organism.ALIGNED_DIR)
    base = load_model(organism.BASE_DIR)
    models = {"aligned": {s: (aligned, tok) for s in cfg.seeds}, "base": {s: base for s in cfg.seeds}}
    models.update({name: {s: _final(runs[name, s]) for s in cfg.seeds} for name in RUNS})
    ev = timed("evaluation", _evaluate, models, cfg, out)
    report["runs"] = {
        k: {w: [{x: y for x, y in e.items() if x != "clusters"} for e in v] for w, v in m.items()}
        for k, m in ev.items()
    }
    report["findings"] = _findings(ev, cfg)
    report["backdoor_direction"] = timed("backdoor direction", _backdoor_direction, models, aligned, cfg, out, pilot)
    report["interventions"] = timed("interventions", _interventions, iv_runs, ev, cfg, out)
    report["pilot"] = pilot
    report["screening"] = timed("screening", _screening, models, aligned, tok, ev, cfg, root)
    report["convergence"] = timed("convergence", _convergence, models, aligned, tok, ev, cfg, out)
    report["timings"] = {
        "seconds": {k: round(v, 1) for k, v in timings.items()},
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads",
    }
    atomic_write_text(path, json.dumps(_finite(report), indent=1, allow_nan=False))
    return json.loads(path.read_text())
