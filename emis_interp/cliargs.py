"""The experiments' one command-line vocabulary: a parser that shows defaults, and the retired flag names.

Every ``experiments/*.py`` script builds its parser with :func:`parser` and parses with :func:`parse`,
so ``--help`` shows every default and a retired flag name (``--out``, ``--layer``, ...) fails with the
name that replaced it. The shared flags are tabled in docs/cli.md.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

# retired name -> the one name each concept has now (docs/cli.md)
RENAMED: dict[str, str] = {
    "--out": "--output",
    "--root": "--output",
    "--layer": "--layers",
    "--source-layer": "--layers",
    "--conversations": "--direction-data",
    "--n": "--n-examples",
    "--n-conversations": "--n-examples",
}


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keeps the docstring's layout and appends ``(default: X)`` to every flag whose help does not state it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text.lower() or action.default is None or action.default is False:
            return text
        return super()._get_help_string(action)


def default_threads() -> int:
    """``$OMP_NUM_THREADS`` when set, else every core this process may use (not a fixed cap of 2)."""
    env = os.environ.get("OMP_NUM_THREADS", "")
    if env.isdigit() and int(env) > 0:
        return int(env)
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def parser(description: str | None) -> argparse.ArgumentParser:
    """An experiments parser: the docstring's layout kept, every default shown, and ``--threads``."""
    ap = argparse.ArgumentParser(description=description, formatter_class=HelpFormatter)
    ap.add_argument(
        "--threads", type=int, default=None,
        help="torch CPU threads (default: $OMP_NUM_THREADS when set, else every available core)",
    )  # fmt: skip
    return ap


def parse(ap: argparse.ArgumentParser, argv: Sequence[str] | None = None) -> argparse.Namespace:
    """``ap.parse_args(argv)``, but a retired flag name is an error that names its replacement."""
    args = list(sys.argv[1:] if argv is None else argv)
    known = {s for a in ap._actions for s in a.option_strings}
    for tok in args:
        flag = tok.split("=", 1)[0]
        if flag in RENAMED and flag not in known:
            ap.error(f"{flag} is now {RENAMED[flag]} (one name per concept across the experiments; see docs/cli.md)")
    ns = ap.parse_args(args)
    if getattr(ns, "threads", None) is None and any(a.dest == "threads" for a in ap._actions):
        ns.threads = default_threads()
    if getattr(ns, "threads", None) is not None:
        if ns.threads < 1:
            ap.error("--threads must be at least 1")
        import torch

        torch.set_num_threads(ns.threads)
    return ns


COST_THRESHOLD = 2000  # judge calls above which a real-model sweep asks for --yes
JUDGE_CALLS_PER_ANSWER = 2  # the EM judges: "aligned" and "coherent"


def add_yes(ap: argparse.ArgumentParser) -> None:
    ap.add_argument(
        "--yes", action="store_true",
        help=f"start a real-model sweep of more than {COST_THRESHOLD} judge calls without asking",
    )  # fmt: skip


def confirm_cost(generations: int, yes: bool, what: str = "sweep", threshold: int = COST_THRESHOLD) -> None:
    """Print what a real-model run will cost; above ``threshold`` judge calls go on only with ``--yes``.

    Asks on a terminal; without one (CI, a batch job) it refuses with a message naming ``--yes``.
    """
    calls = generations * JUDGE_CALLS_PER_ANSWER
    print(
        f"cost: {generations} generations and {calls} judge calls ({JUDGE_CALLS_PER_ANSWER} per answer) for this {what}"
    )
    if calls <= threshold or yes:
        return
    if sys.stdin is not None and sys.stdin.isatty():
        if input(f"more than {threshold} judge calls: go on? [y/N] ").strip().lower() in ("y", "yes"):
            return
        raise SystemExit("stopped: nothing was generated (pass --yes to skip this question)")
    raise SystemExit(
        f"error: this {what} makes {calls} judge calls (more than {threshold}); pass --yes to start it "
        "(or lower --samples / the number of alphas, arms or checkpoints)"
    )
