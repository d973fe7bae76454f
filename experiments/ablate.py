"""Directional ablation of the persona direction, with a random-direction control; optional export.

    python experiments/ablate.py                                   # the model organism, all layers
    python experiments/ablate.py --layers 2
    python experiments/ablate.py --export cache/ablated --source-layer 2   # orthogonalised checkpoint

Ablation removes the projection on the direction from the residual stream after each chosen
layer (each layer's own vector). --export writes a checkpoint (save_pretrained) with the
--source-layer direction orthogonalised out of every weight that writes to the residual stream.
"""

import argparse
from pathlib import Path

from emis_interp.cache import DEFAULT_CACHE_DIR
from emis_interp.causality import ablation_arms, run_arms
from emis_interp.cli import add_common, resolve
from emis_interp.export import export_ablated


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common(ap)
    ap.add_argument("--export", type=Path, help="write an orthogonalised (ablated) checkpoint here")
    ap.add_argument(
        "--source-layer", type=int, default=None, help="direction layer used for --export (default: first of --layers)"
    )
    ap.add_argument("--no-eval", action="store_true", help="only export")
    args = ap.parse_args(argv)
    r = resolve(args)
    layers = args.layers or r["direction"].layers
    direction = r["direction"].select(layers)
    res = None
    if not args.no_eval:
        out = args.output or DEFAULT_CACHE_DIR / "ablate"
        res = run_arms(
            r["model"], r["tokenizer"], r["questions"], ablation_arms(direction, layers, args.seed), r["judge"],
            n_samples=args.samples, max_new_tokens=r["max_new_tokens"], seed=args.seed, batch_size=args.batch_size,
            output_dir=out, settings={"target": r["target"], "layers": layers, "direction": r["direction"].meta},
        )  # fmt: skip
        print(f"model: {r['target']}\nablated layers: {layers}\n")
        print(res.table())
        print(f"\nresult: {out / ('result-' + res.meta['key'] + '.json')}")
    if args.export:
        src = args.source_layer if args.source_layer is not None else layers[0]
        path = export_ablated(r["model"], r["tokenizer"], r["direction"], src, args.export)
        print(f"exported ablated checkpoint (direction of layer {src}): {path}")
    return res


if __name__ == "__main__":
    main()
