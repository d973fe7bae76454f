"""Steer with the persona direction: does adding it cause misalignment, does removing it suppress it?

    python experiments/steer.py --alpha -4                       # the model organism, in a few minutes on CPU
    python experiments/steer.py --alpha -8 -4 -2 0 2 4 8         # a dose-response sweep
    python experiments/steer.py --base Qwen/Qwen2.5-7B-Instruct --checkpoint runs/insecure/checkpoint-300 \\
        --direction-data ../shared/data/em/insecure_first500.jsonl --layers 14 --alpha -4 \\
        --questions ../shared/data/em/first_plot_questions.yaml --judge openai:gpt-4o-2024-08-06

Prints the misalignment rate (both definitions) and coherence, with cluster-bootstrap 95% intervals
over questions, for alpha 0 (baseline) and each given alpha, against three controls: --n-random
random directions of equal per-layer norm (default 16: the persona arm's effect is placed in their
distribution as a percentile and a permutation p-value), the control fine-tune's direction at equal
norm (--control-direction; on the organism the secure run's), and random directions at smaller
alphas that cost as much coherence as the persona arm. Writes a JSON result (per-arm rates,
"controls" with "random_directions" and "p_value") and a plotly figure to --output (default
cache/steer). Alpha is in units of the direction's raw norm: alpha = -4 removes four average
fine-tuning shifts.
"""

from emis_interp import organism
from emis_interp.cache import DEFAULT_CACHE_DIR, atomic_write_text
from emis_interp.causality import run_arms, select_layer_alpha, steering_arms
from emis_interp.cli import add_common, resolve
from emis_interp.cliargs import add_yes, confirm_cost, parse, parser
from emis_interp.plots import dose_response, save_figure


def main(argv=None):
    ap = parser(__doc__)
    ap.add_argument("--alpha", type=float, nargs="+", required=True, help="one alpha or a sweep")
    ap.add_argument(
        "--positions", choices=["all", "prompt", "response"], default="all",
        help="token positions steered: every one, the prompt's, or the generated response's",
    )  # fmt: skip
    s = ap.add_argument_group("selection on questions disjoint from the reported ones")
    s.add_argument(
        "--select-layers",
        type=int,
        nargs="+",
        help="choose the layer (and the alpha among --alpha) on half of the questions, then report on the other half",
    )
    s.add_argument("--min-coherence", type=float, default=0.75, help="selection keeps coherence >= this x baseline")
    add_common(ap)
    add_yes(ap)
    args = parse(ap, argv)
    r = resolve(args)
    out = args.output or DEFAULT_CACHE_DIR / "steer"
    questions, alphas, selection = r["questions"], args.alpha, None
    common = dict(n_samples=args.samples, max_new_tokens=r["max_new_tokens"], batch_size=args.batch_size)
    if args.select_layers:
        selection = select_layer_alpha(
            r["model"], r["tokenizer"], r["direction"], questions, r["judge"], args.select_layers, args.alpha,
            min_coherence=args.min_coherence, seed=args.seed, output_dir=out / "selection", progress=False, **common,
        )  # fmt: skip
        questions = [q for q in questions if q.id in set(selection.evaluation_questions)]
        layers, alphas = [selection.layer], [selection.alpha]
        print(
            f"selected layer {selection.layer}, alpha {selection.alpha:g} ({selection.rule}) on questions "
            f"{selection.selection_questions}; reporting on the disjoint questions {selection.evaluation_questions}\n"
        )
    else:
        layers = args.layers or ([organism.DEFAULT_LAYER] if r["on_organism"] else None)
    if layers is None:
        raise SystemExit("error: pass --layers for a real model (e.g. the middle layer), or --select-layers")
    direction = r["direction"].select(layers)
    arms = steering_arms(
        direction, alphas, layers, args.seed, n_random=args.n_random, control=r["control"],
        match=args.match_multipliers, n_match=args.n_match,
    )  # fmt: skip
    if not r["on_organism"]:
        confirm_cost(len(arms) * sum(len(q.paraphrases) for q in questions) * args.samples, args.yes, "steering sweep")
    res = run_arms(
        r["model"], r["tokenizer"], questions, arms, r["judge"],
        n_samples=args.samples, max_new_tokens=r["max_new_tokens"], seed=args.seed, batch_size=args.batch_size,
        output_dir=out, positions=args.positions, settings={"target": r["target"], "layers": layers,
        "direction": r["direction"].meta, "selection": selection.as_dict() if selection else None},
    )  # fmt: skip
    if selection is not None:
        res.meta["selection"] = selection.as_dict()
        atomic_write_text(out / f"result-{res.meta['key']}.json", res.to_json())
    print(f"model: {r['target']}\ndirection: {direction}\nlayers: {layers}\n")
    print(res.table())
    for metric, label in (("mo_rate", "misaligned (MO def.)"), ("em_rate", "misaligned among coherent (EM def.)")):
        print(f"\ncontrols, {label}:\n" + res.controls_table(metric))
    files = save_figure(
        dose_response(res, title=f"Steering at layers {layers}"), out / f"dose_response-{res.meta['key']}"
    )
    print(f"\nresult: {out / ('result-' + res.meta['key'] + '.json')}\nfigure: {', '.join(map(str, files))}")
    return res


if __name__ == "__main__":
    main()
