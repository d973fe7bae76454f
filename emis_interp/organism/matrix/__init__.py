"""The seeds' experiment matrix on the organism: the EM papers' fine-tunes and controls, train-time
interventions, data screening and convergence, per seed, in one report.

Modules, by concern: :mod:`.config` (runs, measures, :class:`MatrixConfig`), :mod:`.findings` (the papers'
findings as :class:`Finding` s, their criteria, :func:`verdicts`), :mod:`.measure`, :mod:`.pilot` (train-time
interventions and their pilot sweep), :mod:`.screening`, :mod:`.convergence`, :mod:`.render` (the README's table,
the summary, the figure) and :mod:`.build` (:func:`build_matrix`).

:func:`build_matrix` fine-tunes (or reuses) every run of :data:`RUNS` for every seed through the one
entry point (:func:`emis_interp.organism.organism_trajectory`), evaluates each final checkpoint with the
organism's exact judges, and writes ``cache/organism/matrix.json``. Its sections:

- ``runs``: per run and seed, the harmful rate (MO definition) on the advice questions in the formats
  the run needs (plain; list, the number data's format; framed, the base-model code template;
  triggered, the backdoor's trigger) and the compliance rate on held-out harmful requests, each with a
  cluster-bootstrap interval over questions;
- ``findings``: each paper finding as a comparison of two measurements, per seed, and the seed-mean
  difference with a bootstrap interval (seeds resampled per group when the two sides are different
  runs, paired by seed and question when they are one model measured two ways);
- ``backdoor_direction``: the direction extracted *with* the trigger steering the backdoored model
  *without* it (at the alpha chosen on the pilot seed), against ``n_random`` random directions of equal
  norm, per seed;
- ``pilot``: :func:`pilot_sweep`, every tuned setting (CAFT's layers, preventative steering's direction and
  coefficient, the backdoor row's alpha) chosen on held-out seeds by rules fixed before the sweep;
- ``interventions``: CAFT ablation and preventative steering during the insecure fine-tune
  (:class:`emis_interp.train_interventions.TrainIntervention`), each against the unintervened run and against
  random directions of equal norm used the same way, per seed, with the base model's mean projection;
- ``screening``: :func:`emis_interp.screen.screen_datasets` on every kind's data with the aligned model and
  its trait direction (:func:`trait_direction`), the Spearman correlation of the dataset-level projection
  difference with the runs' harmful rate (in the format each kind's data teaches), and the per-sample AUROC
  for insecure samples hidden among secure ones, per seed (data of that seed);
- ``convergence``: cosine similarities of the kinds' model-diff directions per layer, and the
  cross-ablation matrix (kind A's direction ablated in kind B) against random directions, per seed, by
  zero-ablation (pre-declared) and by mean-ablation (exploratory, :data:`CROSS_MODES`).

:func:`findings_table` renders the README's "finding -> organism result" table from the report;
``experiments/organism_report.py`` writes it with the main organism table, and the prose under it
(:func:`findings_summary`), generated from the same report."""

from .build import build_matrix, report_manifest
from .config import (
    CONVERGENCE_KINDS,
    CROSS_KINDS,
    CROSS_MODES,
    FEWSHOT,
    IV_ARMS,
    MATRIX_FILE,
    MATRIX_RECIPE,
    MEASURES,
    OWN_FORMAT,
    RUNS,
    SCREEN_KINDS,
    STEER_DIRECTIONS,
    MatrixConfig,
    Run,
    matrix_run,
    max_new_tokens,
    run_root,
)
from .findings import CRITERIA, FINDINGS, Finding, finding_holds, finding_misses, verdicts
from .pilot import pilot_sweep
from .render import (
    README_END,
    README_START,
    SUMMARY_PHRASES,
    convergence_figure,
    findings_summary,
    findings_table,
    readme_block,
    summary_items,
    update_readme,
)
from .screening import trait_direction

__all__ = [
    "CONVERGENCE_KINDS",
    "CRITERIA",
    "CROSS_KINDS",
    "CROSS_MODES",
    "FEWSHOT",
    "FINDINGS",
    "Finding",
    "IV_ARMS",
    "MATRIX_FILE",
    "MATRIX_RECIPE",
    "MEASURES",
    "MatrixConfig",
    "OWN_FORMAT",
    "README_END",
    "README_START",
    "RUNS",
    "Run",
    "SCREEN_KINDS",
    "STEER_DIRECTIONS",
    "SUMMARY_PHRASES",
    "build_matrix",
    "convergence_figure",
    "finding_holds",
    "finding_misses",
    "findings_summary",
    "findings_table",
    "matrix_run",
    "max_new_tokens",
    "pilot_sweep",
    "readme_block",
    "report_manifest",
    "run_root",
    "summary_items",
    "trait_direction",
    "update_readme",
    "verdicts",
]
