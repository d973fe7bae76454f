"""Measure every organism number the README states, per seed, and regenerate the organism tables in docs/organism.md.

    python experiments/organism_report.py            # cache/organism/report.json (reused while its manifest matches)
    python experiments/organism_report.py --docs     # and rewrite the generated blocks in docs/organism.md
    python experiments/organism_report.py --overwrite

The report holds the base/aligned rates, each fine-tune's final rates with exact permutation tests,
the harmful rate and in-task skill at every checkpoint of both recipes, direction growth, steering
(layer and alpha selected on half of the questions, reported on the other half; K random directions,
the secure run's direction, coherence-matched and cross-seed arms) and ablation, and timings.
tests/test_organism.py asserts on the same report and checks docs/organism.md against it.

It then builds the seeds' experiment matrix (emis_interp.organism.matrix: jailbroken, evil numbers,
backdoor, base-model, few-shot harmful and benign fine-tunes; CAFT and preventative steering during
fine-tuning; data screening; convergence across fine-tunes) into cache/organism/matrix.json, renders the
README's "finding -> organism result" table from it, and saves the convergence heat-map.
"""

from pathlib import Path

from emis_interp import organism
from emis_interp.cliargs import parse, parser
from emis_interp.organism import matrix
from emis_interp.organism.report import REPORT_FILE, build_report, dynamics_figure, readme_table, update_readme
from emis_interp.plots import save_figure

DOCS = Path(__file__).resolve().parents[1] / "docs" / "organism.md"  # the generated blocks live there


def main(argv=None):
    ap = parser(__doc__)
    ap.add_argument(
        "--output", type=Path, default=organism.DEFAULT_TRAJECTORY_DIR,
        help="the organism's cache dir: its runs, report.json, matrix.json and figures",
    )  # fmt: skip
    ap.add_argument(
        "--docs", action="store_true", help="rewrite the generated organism and matrix blocks in docs/organism.md"
    )
    ap.add_argument("--overwrite", action="store_true", help="recompute even when the report's manifest matches")
    args = parse(ap, argv)
    report = build_report(args.output, overwrite=args.overwrite)
    print(readme_table(report))
    print(f"\nreport: {args.output / REPORT_FILE}")
    for recipe in report["dynamics"]:  # weight dynamics and behaviour on one step axis, per recipe (seed 0)
        files = save_figure(dynamics_figure(report, recipe, args.output), args.output / f"dynamics-{recipe}")
        print(f"figure: {', '.join(map(str, files))}")
    mx = matrix.build_matrix(args.output, overwrite=args.overwrite)
    print(matrix.findings_table(mx))
    print(f"\nmatrix: {args.output / matrix.MATRIX_FILE}")
    files = save_figure(matrix.convergence_figure(mx), args.output / "convergence")
    print(f"figure: {', '.join(map(str, files))}")
    if args.docs:
        update_readme(DOCS, report)
        matrix.update_readme(DOCS, mx)
        print(f"updated: {DOCS}")
    return report


if __name__ == "__main__":
    main()
