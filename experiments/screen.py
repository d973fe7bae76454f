"""Screen fine-tuning data before training: which datasets push the model along the persona direction?

    python experiments/screen.py                          # the organism: every world.FINETUNE_KINDS dataset
    python experiments/screen.py --model Qwen/Qwen2.5-7B-Instruct --direction evil_l19.safetensors --layers 19 \\
        --data ../shared/data/em/insecure_first500.jsonl ../shared/data/em/jailbroken.jsonl --output runs/screen

For every sample (a user prompt and its training response) of every dataset, on the model about to
be fine-tuned: the mean over the response tokens of the residual after decoder layer --layers,
projected on the unit persona direction (``projection``); the same for the model's own answer to
the prompt, generated greedily (``--temperature 0``, the default; ``--temperature T`` samples with
--seed) with at most --max-new-tokens tokens (``own_projection``); and their ``difference``. A
dataset with a large positive mean difference moves the model toward the persona when trained on.

Writes to --output (default cache/screen): ``screen_<name>.csv`` (per sample) and ``.json``
(with the manifest), ``screen_summary.csv`` (one row per dataset) and ``screen_histogram.html``
(+ ``.png`` where Chromium exists), and prints the summary table (highest mean difference first).
A rerun reuses every dataset screened under the same manifest; an output directory made under
another model, direction, layer or generation setting is refused unless --overwrite.

On the model organism (no --model) the model is the aligned organism (the model the organism's runs
fine-tune), the direction its trait direction (``organism.matrix.trait_direction``: the aligned model's
mean residual over harmful minus benign advice answers, which depends on no fine-tune and no training
data) at layer 2, and the datasets are ``world.finetune_dataset(kind, --n-examples, seed=--data-seed)`` for every
fine-tuning kind (default --data-seed 1000: rows no organism fine-tune of seeds 0-999 trains on).
On a real model nothing falls back to the organism: --direction, --layers and --data are required.
Data files are chat JSONL, one ``{"messages": [system?, user, assistant]}`` per line (the EM
paper's format), named by their file stem.
"""

import argparse
from pathlib import Path

from emis_interp import organism
from emis_interp.cache import DEFAULT_CACHE_DIR
from emis_interp.cliargs import parse, parser
from emis_interp.conversations import Conversation, load_jsonl
from emis_interp.directions import PersonaDirection
from emis_interp.models import load_model
from emis_interp.organism import world
from emis_interp.screen import screen_datasets, summary_table

ORGANISM_N = 64  # samples per organism dataset


def parse_args(argv=None) -> argparse.Namespace:
    ap = parser(__doc__)
    g = ap.add_argument_group("model and direction (default: the model organism)")
    g.add_argument("--model", help="the model to be fine-tuned: HF id, local dir or LoRA adapter dir")
    g.add_argument("--direction", type=Path, help="a saved PersonaDirection (.safetensors); required with --model")
    g.add_argument(
        "--layers", type=int, nargs=1, help="the layer to project at (default: organism layer 2; required with --model)"
    )
    g.add_argument("--device-map", default=None, help="passed to accelerate, e.g. 'auto' for multi-GPU models")
    d = ap.add_argument_group("data")
    d.add_argument("--data", type=Path, nargs="+", help="chat JSONL files (default on the organism: every world kind)")
    d.add_argument(
        "--n-examples",
        type=int,
        default=None,
        help=f"rows per dataset (default: {ORGANISM_N} on the organism, else all)",
    )
    d.add_argument(
        "--max-new-tokens", type=int, default=None, help="own answers: default 40 on the organism, 600 (EM paper) else"
    )
    d.add_argument("--temperature", type=float, default=0.0, help="own answers: 0 is greedy (default)")
    d.add_argument("--seed", type=int, default=0, help="sampling seed of the own answers (temperature > 0)")
    d.add_argument("--data-seed", type=int, default=1000, help="organism data seed (default: held out from the runs)")
    d.add_argument("--batch-size", type=int, default=32, help="sequences per forward pass / generate call")
    ap.add_argument("--output", type=Path, default=DEFAULT_CACHE_DIR / "screen", help="results directory")
    ap.add_argument("--overwrite", action="store_true", help="discard results made under other settings")
    a = parse(ap, argv)
    if a.model is not None:
        check_real_model_args(a)
    if a.n_examples is not None and a.n_examples < 1:
        ap.error("--n-examples must be at least 1")
    return a


def check_real_model_args(a: argparse.Namespace) -> None:
    """On a real model nothing falls back to the organism: name every missing flag at once."""
    missing = []
    if a.direction is None:
        missing.append("--direction FILE (a saved PersonaDirection of this model)")
    if a.layers is None:
        missing.append("--layers L (one of the direction's layers; the organism's layer 2 means nothing here)")
    if not a.data:
        missing.append("--data FILE [FILE ...] (chat JSONL, e.g. ../shared/data/em/insecure_first500.jsonl)")
    if missing:
        raise SystemExit("error: on a real model (--model) pass " + "; ".join(missing))


def datasets_from_files(paths: list[Path], n: int | None) -> dict[str, list[Conversation]]:
    """``{file stem: conversations}``, the first ``n`` rows of each file (all with None)."""
    stems = [p.stem for p in paths]
    dupes = sorted({s for s in stems if stems.count(s) > 1})
    if dupes:
        raise SystemExit(f"error: --data files share the name(s) {dupes}; rename them (datasets are named by stem)")
    return {p.stem: load_jsonl(p, limit=n) for p in paths}


def organism_datasets(n: int, seed: int) -> dict[str, list[Conversation]]:
    """Every fine-tuning kind of the organism's world, ``n`` rows each."""
    return {
        kind: [Conversation.from_messages(r["messages"]) for r in world.finetune_dataset(kind, n, seed=seed)]
        for kind in world.FINETUNE_KINDS
    }


def organism_direction(aligned, tokenizer) -> PersonaDirection:
    """The organism's trait direction in the aligned model (harmful minus benign advice answers), at every layer."""
    from emis_interp.organism.matrix import trait_direction

    return trait_direction(aligned, tokenizer, range(aligned.config.num_hidden_layers))


def main(argv=None) -> dict:
    a = parse_args(argv)
    on_organism = a.model is None
    target = str(organism.ALIGNED_DIR) if on_organism else a.model
    if a.data:
        datasets = datasets_from_files(a.data, a.n_examples)
    else:
        datasets = organism_datasets(a.n_examples or ORGANISM_N, a.data_seed)
    model, tok = load_model(target, device_map=a.device_map)
    direction = PersonaDirection.load(a.direction) if a.direction is not None else organism_direction(model, tok)
    layer = organism.DEFAULT_LAYER if a.layers is None else a.layers[0]
    max_new_tokens = a.max_new_tokens or (40 if on_organism else 600)
    results = screen_datasets(
        model, tok, datasets, direction, layer, a.output, max_new_tokens=max_new_tokens, temperature=a.temperature,
        seed=a.seed, batch_size=a.batch_size, overwrite=a.overwrite,
    )  # fmt: skip
    how = "greedy" if a.temperature == 0 else f"sampled at temperature {a.temperature:g}, seed {a.seed}"
    print(f"model: {target}\ndirection: {direction}\nlayer: {layer}")
    print(f"own answers: {how}, at most {max_new_tokens} new tokens\n")
    print(summary_table(results))
    files = [f"screen_{name}.csv" for name in results] + ["screen_summary.csv", "screen_histogram.html"]
    files += ["screen_histogram.png"] if (a.output / "screen_histogram.png").exists() else []
    print(f"\nwritten to {a.output}: {', '.join(files)}")
    return results


if __name__ == "__main__":
    main()
