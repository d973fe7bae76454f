"""Directional ablation of the persona direction, with a random-direction control; optional export.

    python experiments/ablate.py                                   # the model organism, layer 2's direction
    python experiments/ablate.py --layers 1
    python experiments/ablate.py --export cache/ablated            # also write the ablated checkpoint

Ablation removes the unit direction of the --layers layer from the whole residual stream: from the
embeddings and from every attention and MLP output (so from the residual at every point). That is
exactly what --export bakes into the weights (the direction orthogonalised out of every weight
that writes to the residual stream, saved with the save_pretrained layout): the evaluated arm and
the exported checkpoint are the same model (tested).
"""

from pathlib import Path

from emis_interp import organism
from emis_interp.cache import DEFAULT_CACHE_DIR
from emis_interp.causality import ablation_arms, run_arms
from emis_interp.cli import add_common, resolve
from emis_interp.cliargs import parse, parser
from emis_interp.export import export_ablated


def source_layer(args, on_organism: bool) -> int:
    """The one layer whose direction is removed from the whole stream (``--layers L``)."""
    if args.layers and len(args.layers) == 1:
        return args.layers[0]
    if on_organism and not args.layers:
        return organism.DEFAULT_LAYER
    raise SystemExit("error: pass --layers L (one layer): the layer whose direction is removed from the whole stream")


def main(argv=None):
    ap = parser(__doc__)
    add_common(ap)
    ap.add_argument("--export", type=Path, help="write the ablated (orthogonalised) checkpoint here")
    ap.add_argument("--no-eval", action="store_true", help="only export")
    args = parse(ap, argv)
    r = resolve(args)
    src = source_layer(args, r["on_organism"])
    direction = r["direction"].select(src)
    res = None
    if not args.no_eval:
        out = args.output or DEFAULT_CACHE_DIR / "ablate"
        res = run_arms(
            r["model"], r["tokenizer"], r["questions"], ablation_arms(
                direction, random_seed=args.seed, source_layer=src, n_random=args.n_random,
                control=r["control"].select(src) if r["control"] is not None else None,
            ),
            r["judge"], n_samples=args.samples, max_new_tokens=r["max_new_tokens"], seed=args.seed,
            batch_size=args.batch_size, output_dir=out,
            settings={"target": r["target"], "source_layer": src, "direction": r["direction"].meta},
        )  # fmt: skip
        print(f"model: {r['target']}\nablated: the layer-{src} direction, from every residual-stream write\n")
        print(res.table())
        for metric, label in (("mo_rate", "misaligned (MO def.)"), ("em_rate", "misaligned among coherent (EM def.)")):
            print(f"\ncontrols, {label}:\n" + res.controls_table(metric))
        print(f"\nresult: {out / ('result-' + res.meta['key'] + '.json')}")
    if args.export:
        path = export_ablated(r["model"], r["tokenizer"], direction, src, args.export)
        print(f"exported ablated checkpoint (direction of layer {src}, as evaluated above): {path}")
    return res


if __name__ == "__main__":
    main()
