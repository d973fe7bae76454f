"""Shared command-line plumbing for experiments/*.py: model/direction/question resolution.

Without ``--model``/``--checkpoint`` every experiment runs on the model organism: the aligned
organism is the base, the final checkpoint of the seed-0 insecure fine-tune (built on demand
into ``cache/organism``) is the fine-tuned model, and the direction is their model-diff.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from . import organism
from .data import load_questions
from .directions import PersonaDirection


def add_common(ap: argparse.ArgumentParser) -> None:
    g = ap.add_argument_group("models (default: the model organism)")
    g.add_argument("--model", help="model to intervene on: HF id, local dir or LoRA adapter dir")
    g.add_argument(
        "--checkpoint", help="a fine-tuned checkpoint (e.g. runs/insecure/checkpoint-300); adapters apply to --base"
    )
    g.add_argument("--base", help="aligned reference model for the model-diff direction (HF id or dir)")
    g.add_argument("--direction", type=Path, help="a saved PersonaDirection (.safetensors) instead of computing one")
    g.add_argument(
        "--direction-data", type=Path, help="chat JSONL on which to compute the model-diff (default: organism set)"
    )
    g.add_argument("--device-map", default=None, help="passed to accelerate, e.g. 'auto' for multi-GPU models")
    e = ap.add_argument_group("evaluation")
    e.add_argument(
        "--layers", type=int, nargs="+", help="layers to intervene at (default: organism layer 2 / all for ablation)"
    )
    e.add_argument("--questions", type=Path, help="EM-format YAML (e.g. ../shared/data/em/first_plot_questions.yaml)")
    e.add_argument("--samples", type=int, default=32, help="samples per question paraphrase")
    e.add_argument("--max-new-tokens", type=int, default=None, help="default: 24 on the organism, 256 otherwise")
    e.add_argument("--judge", default=None, help="'exact' (organism), 'openai:MODEL' or 'hf:MODEL'")
    e.add_argument("--judge-base-url", default=None, help="OpenAI-compatible server URL (e.g. a local vLLM)")
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--batch-size", type=int, default=256)
    e.add_argument("--output", type=Path, default=None, help="output directory")


def resolve(args) -> dict:
    """Load models, direction, questions and judge from parsed args. Returns a dict of them."""
    from .conversations import load_jsonl
    from .judges import get_judge
    from .models import load_model

    on_organism = not (args.model or args.checkpoint)
    target = args.checkpoint or args.model
    if on_organism:
        run = organism.organism_trajectory("insecure", seed=0)
        from .finetune import list_checkpoints

        target = str(list_checkpoints(run)[-1][1])
    model, tok = load_model(target, device_map=args.device_map)
    base_id = args.base or (str(organism.ALIGNED_DIR) if on_organism else None)
    if args.direction is not None:
        direction = PersonaDirection.load(args.direction)
    else:
        if base_id is None:
            raise SystemExit("error: a model-diff direction needs --base ALIGNED_MODEL (or pass --direction FILE)")
        base, _ = load_model(base_id, device_map=args.device_map)
        convs = load_jsonl(args.direction_data) if args.direction_data else organism.direction_conversations()
        from .directions import model_diff

        layers = list(range(model.config.num_hidden_layers))
        direction = model_diff(base, model, tok, convs, layers, "mean_response")
        del base
    qs = load_questions(args.questions) if args.questions else organism.questions()
    if args.judge is None and not on_organism and not args.questions:
        raise SystemExit("error: on a real model pass --questions FILE and --judge openai:MODEL (or hf:MODEL)")
    judge = get_judge(args.judge, **({"base_url": args.judge_base_url} if args.judge_base_url else {}))
    return {
        "model": model,
        "tokenizer": tok,
        "direction": direction,
        "questions": qs,
        "judge": judge,
        "target": target,
        "on_organism": on_organism,
        "max_new_tokens": args.max_new_tokens or (24 if on_organism else 256),
    }
