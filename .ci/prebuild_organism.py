"""Build the science tier's organism fine-tunes and its two reports on both CPU cores, before the tests read them.

The science tier spends most of its time in the organism's 66 fine-tunes and in the report and matrix builds
(``cache/organism``). Run serially, one process gets little from a second thread (the organism is 128-dim: Python
overhead dominates), so ``.ci/run`` runs this script as two processes of one thread each, in two phases:

1. ``--phase runs --part K --of 2``: part K of every plain run the matrix fine-tunes (its kinds for its seeds, the
   report's 9 default-recipe runs among them, and the pilot's plain runs), split so that no run is built by both;
2. ``--phase report`` and ``--phase matrix``, side by side, only once phase 1 has finished in both processes: the
   report (and its 3 late-recipe runs) and the matrix (and its pilot and intervention runs). The shared runs are
   finished by then, so the two processes never write one cache entry.

Every run and report is the library's own cache entry, keyed by its manifest: the tests find them and reuse them,
and a run that this script did not finish is built (or resumed) by the tests, serially. Nothing here decides a
number: a fine-tune's weights are bit-equal with one or two threads (checked on a 30-step organism run).
"""

from __future__ import annotations

import argparse
import time


def _modules():
    from emis_interp.organism import matrix, report

    return matrix, report


def plain_runs(matrix) -> list[tuple[str, int]]:
    """(run name, seed) of every plain (unintervened) matrix fine-tune, the pilot's included, in a fixed order."""
    cfg = matrix.MatrixConfig()
    runs = [(name, s) for name in matrix.RUNS for s in cfg.seeds]
    runs += [("insecure", cfg.pilot_seed), ("insecure", cfg.pilot_direction_seed), ("backdoor", cfg.pilot_seed)]
    return list(dict.fromkeys(runs))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--phase", choices=["runs", "report", "matrix"], required=True, help="what to build")
    ap.add_argument("--part", type=int, default=0, help="phase runs: which part of the runs to build (0-based)")
    ap.add_argument("--of", type=int, default=2, help="phase runs: in how many parts the runs are split")
    ap.add_argument("--dry-run", action="store_true", help="list what would be built, build nothing")
    a = ap.parse_args(argv)
    if not 0 <= a.part < a.of:
        ap.error(f"--part {a.part} must be in 0..{a.of - 1}")
    import torch

    torch.set_num_threads(1)
    matrix, report = _modules()
    t = time.perf_counter()
    if a.phase == "runs":
        mine = plain_runs(matrix)[a.part :: a.of]
        for name, s in mine:
            print(f"[prebuild {a.part}/{a.of}] {name} seed {s}", flush=True)
            if not a.dry_run:
                matrix.matrix_run(name, s)
    elif a.phase == "report":
        print("[prebuild] organism report", flush=True)
        if not a.dry_run:
            report.build_report()
    else:
        print("[prebuild] organism matrix", flush=True)
        if not a.dry_run:
            matrix.build_matrix()
    print(f"[prebuild] phase {a.phase} part {a.part}: {time.perf_counter() - t:.0f} s", flush=True)


if __name__ == "__main__":
    main()
