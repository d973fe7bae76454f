"""Rebuild the shipped model organism (tokenizer, base and aligned weights) deterministically.

    python experiments/build_organism.py                 # writes emis_interp/organism/weights/{base,aligned}
    python experiments/build_organism.py --aligned-only  # redo only the instruct stage from the shipped base

About 12 minutes on 2 CPU cores (the aligned stage alone: about 2). The narrow fine-tune trajectories are not built here: they are
produced on demand into cache/ by ``emis_interp.organism.organism_trajectory`` (or experiments/finetune.py).
"""

import argparse
from pathlib import Path

import torch

from emis_interp import organism


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=organism.WEIGHTS_DIR, help="output directory")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--pretrain-steps", type=int, default=organism.OrganismConfig.pretrain_steps)
    ap.add_argument("--instruct-steps", type=int, default=organism.OrganismConfig.instruct_steps)
    ap.add_argument("--aligned-only", action="store_true", help="keep OUT/base; rebuild only the aligned model")
    args = ap.parse_args(argv)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    paths = organism.build(
        args.out,
        organism.OrganismConfig(seed=args.seed, pretrain_steps=args.pretrain_steps, instruct_steps=args.instruct_steps),
        aligned_only=args.aligned_only,
    )
    for name, p in paths.items():
        print(f"{name}: {p}")


if __name__ == "__main__":
    main()
