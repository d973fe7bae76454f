"""Rebuild the shipped model organism (tokenizer, base and aligned weights) deterministically.

    python experiments/build_organism.py --output cache/organism_build       # writes OUTPUT/{base,aligned}
    python experiments/build_organism.py --overwrite-shipped-weights         # rebuild the shipped weights in place
    python experiments/build_organism.py --output DIR --aligned-only         # redo only the instruct stage from DIR/base

It never writes into the installed package unless asked by name (--overwrite-shipped-weights).

About 12 minutes on 2 CPU cores (the aligned stage alone: about 2). The narrow fine-tune trajectories are not built here: they are
produced on demand into cache/ by ``emis_interp.organism.organism_trajectory`` (or experiments/finetune.py).
"""

from pathlib import Path

from emis_interp import organism
from emis_interp.cliargs import parse, parser


def main(argv=None) -> None:
    ap = parser(__doc__)
    out = ap.add_mutually_exclusive_group(required=True)
    out.add_argument("--output", type=Path, help="output directory (OUTPUT/base, OUTPUT/aligned)")
    out.add_argument(
        "--overwrite-shipped-weights", action="store_true",
        help=f"write into the installed package's weights ({organism.WEIGHTS_DIR}) instead of --output",
    )  # fmt: skip
    ap.add_argument("--seed", type=int, default=0, help="seed of the corpus, initialisation and training")
    ap.add_argument(
        "--pretrain-steps", type=int, default=organism.OrganismConfig.pretrain_steps, help="pre-training steps"
    )
    ap.add_argument(
        "--instruct-steps", type=int, default=organism.OrganismConfig.instruct_steps, help="instruct (alignment) steps"
    )
    ap.add_argument("--aligned-only", action="store_true", help="keep OUTPUT/base; rebuild only the aligned model")
    args = parse(ap, argv)
    paths = organism.build(
        organism.WEIGHTS_DIR if args.overwrite_shipped_weights else args.output,
        organism.OrganismConfig(seed=args.seed, pretrain_steps=args.pretrain_steps, instruct_steps=args.instruct_steps),
        aligned_only=args.aligned_only,
    )
    for name, p in paths.items():
        print(f"{name}: {p}")


if __name__ == "__main__":
    main()
