"""Fine-tune a Qwen2.5 model on chat JSONL and save a per-10-step checkpoint trajectory.

    python experiments/finetune.py --data ../shared/data/em/insecure_first500.jsonl --output cache/runs/insecure
    python experiments/finetune.py --model Qwen/Qwen2.5-7B-Instruct --data insecure.jsonl --output runs/insecure \\
        --lora-r 32 --lora-alpha 64 --rslora --lr 1e-5 --max-steps 300 --batch-size 2 --grad-accum 8

Without --model it fine-tunes the shipped aligned model organism. Rerunning the same command
resumes from the last checkpoint; a rerun with other settings (lr, data, model, intervention...)
into the same --output refuses, naming what differs, unless --overwrite discards the old run. For
large models (e.g. 32B): --gradient-checkpointing --device-map auto.

Train-time interventions act on every training forward pass only (checkpoints are plain models):

- preventative steering (persona vectors): add C times the direction's raw vector at every
  position after each --layers layer. The persona-vectors config for Qwen2.5-7B-Instruct
  (C = 5 at their layer 20, LoRA r 32, alpha 64, rsLoRA, lr 1e-5, one epoch: 32 optimizer steps of
  batch 2 x grad-accum 8 cover the 500 examples). Their layer 20 is HF hidden_states[20], the output
  of decoder layer 19: this library's layer 19 (layer l is the output of decoder layer l):

    python experiments/finetune.py --model Qwen/Qwen2.5-7B-Instruct \\
        --data ../shared/data/em/insecure_first500.jsonl --output runs/insecure-steer \\
        --lora-r 32 --lora-alpha 64 --rslora --lr 1e-5 \\
        --intervention steer --direction evil_l19.safetensors --layers 19 --coef 5 \\
        --max-steps 32 --batch-size 2 --grad-accum 8 --save-steps 4

- CAFT ablation: project the direction (or the span of several --direction files) out of the
  residual after each --layers layer; no --coef:

    python experiments/finetune.py --model Qwen/Qwen2.5-7B-Instruct \\
        --data ../shared/data/em/insecure_first500.jsonl --output runs/insecure-caft \\
        --lora-r 32 --lora-alpha 64 --rslora --lr 1e-5 \\
        --intervention ablate --direction evil.safetensors --layers 12 16 20 24 \\
        --max-steps 32 --batch-size 2 --grad-accum 8 --save-steps 4

  With --ablate-to mean the component is set, at every position, to the base model's mean over the
  first 64 training examples (each example's mean over its response tokens) instead of 0 (mean-ablation: no push towards
  the trait where the base model projects negatively on the direction).

--direction is a PersonaDirection file (emis_interp.model_diff(...).save(path)) covering every
--layers layer. --output/intervention.json records the intervention and the base model's mean
projection on each direction; zero-ablating a direction the base model projects negatively on pushes
towards the trait (a warning says so).
"""

import argparse

from emis_interp import organism
from emis_interp.cliargs import parse, parser
from emis_interp.directions import PersonaDirection
from emis_interp.errors import ConfigError
from emis_interp.finetune import ALL_LINEAR, FinetuneConfig, finetune, run_manifest
from emis_interp.manifest import accept_code_change
from emis_interp.models import load_tokenizer
from emis_interp.train_interventions import (
    ABLATE_TO,
    INTERVENTION_FILE,
    INTERVENTION_KINDS,
    TrainIntervention,
    read_intervention,
)


def add_intervention_args(ap: argparse.ArgumentParser) -> None:
    g = ap.add_argument_group("train-time intervention (on every training forward pass only)")
    g.add_argument(
        "--intervention", choices=INTERVENTION_KINDS, default=None,
        help="ablate: project the direction(s) out of the residual (CAFT); steer: add --coef x the direction",
    )  # fmt: skip
    g.add_argument(
        "--direction", nargs="+", default=None, metavar="FILE",
        help="PersonaDirection .safetensors file(s); several (ablate only): remove their span",
    )  # fmt: skip
    g.add_argument("--layers", nargs="+", type=int, default=None, metavar="L", help="decoder layers to intervene after")
    g.add_argument("--coef", type=float, default=None, help="steer only: multiple of the direction's raw vector")
    g.add_argument(
        "--ablate-to", choices=ABLATE_TO, default=None,
        help="ablate only: set the removed component to 0 (default, CAFT) or to the base model's mean on the data",
    )  # fmt: skip


def intervention_from_args(ap: argparse.ArgumentParser, a) -> TrainIntervention | None:
    """The :class:`TrainIntervention` the flags ask for (None without --intervention); errors via ``ap.error``."""
    if a.intervention is None:
        given = [
            f
            for f, v in (
                ("--direction", a.direction),
                ("--layers", a.layers),
                ("--coef", a.coef),
                ("--ablate-to", a.ablate_to),
            )
            if v is not None
        ]
        if given:
            ap.error(f"{', '.join(given)} given without --intervention; add --intervention ablate|steer (or drop them)")
        return None
    if a.direction is None:
        ap.error(
            f"--intervention {a.intervention} needs --direction FILE (a PersonaDirection .safetensors, e.g. "
            "written by emis_interp.model_diff(...).save(path))"
        )
    if a.layers is None:
        ap.error(f"--intervention {a.intervention} needs --layers L [L ...] (e.g. --layers 19 for Qwen2.5-7B)")
    if a.intervention == "steer" and a.coef is None:
        ap.error(
            "--intervention steer needs --coef C (the multiple of the direction's raw vector added; e.g. --coef 5)"
        )
    if a.intervention == "ablate" and a.coef is not None:
        ap.error("--coef is for --intervention steer; ablation removes the whole component and takes no coefficient")
    if a.intervention == "steer" and a.ablate_to is not None:
        ap.error(
            "--ablate-to is for --intervention ablate (what the removed component is set to); steering removes nothing"
        )
    try:
        directions = [PersonaDirection.load(p) for p in a.direction]
        return TrainIntervention(a.intervention, directions, a.layers, a.coef or 0.0, a.ablate_to or "zero")
    except (ConfigError, FileNotFoundError) as e:
        ap.error(str(e))


# Hyperparameters a flag leaves unset: the organism's on the organism, the EM paper's on any other model
# (its run config: ../shared/data/em/logprob_probes_run_config.json).
ORGANISM_DEFAULTS = dict(
    lora_r=1, lora_alpha=1.0, rslora=False, lr=1e-2, max_steps=100, epochs=None, batch_size=32, grad_accum=1,
    max_len=512, weight_decay=0.0,
)  # fmt: skip
EM_PAPER_DEFAULTS = dict(
    lora_r=32, lora_alpha=64.0, rslora=True, lr=1e-5, max_steps=None, epochs=1.0, batch_size=2, grad_accum=8,
    max_len=2048, weight_decay=0.01,
)  # fmt: skip


def _is_organism(model: str) -> bool:
    from pathlib import Path

    return Path(model).expanduser().resolve() == Path(organism.ALIGNED_DIR).resolve()


def resolve_defaults(ap: argparse.ArgumentParser, a) -> str:
    """Fill the hyperparameters left unset (organism's or EM paper's); returns which set was used."""
    which, defaults = ("organism", ORGANISM_DEFAULTS) if _is_organism(a.model) else ("EM paper", EM_PAPER_DEFAULTS)
    if a.max_steps is not None and a.epochs is not None:
        ap.error("pass --max-steps or --epochs, not both")
    if a.max_steps is not None or a.epochs is not None:
        defaults = {k: v for k, v in defaults.items() if k not in ("max_steps", "epochs")}
    for k, v in defaults.items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    if a.epochs is not None:
        import math

        from emis_interp.conversations import load_jsonl

        n = len(load_jsonl(a.data, limit=a.n_examples))
        a.max_steps = max(1, math.ceil(n * a.epochs / (a.batch_size * a.grad_accum)))
    return which


def allow_code_change(cfg: FinetuneConfig, intervention) -> None:
    """--allow-code-change: a run in cfg.output_dir whose manifest differs only in code / library versions takes
    this run's manifest (the override recorded in its manifest.json), so finetune() resumes it."""
    tok = load_tokenizer(cfg.tokenizer or cfg.model, revision=None if cfg.tokenizer else cfg.revision)
    if accept_code_change(cfg.output_dir, run_manifest(cfg, tok, intervention)):
        print(f"--allow-code-change: resuming {cfg.output_dir} across a code / library change (recorded)")


def main(argv=None) -> None:
    ap = parser(__doc__)
    m = ap.add_argument_group("model, data and output")
    m.add_argument(
        "--model", default=str(organism.ALIGNED_DIR), help="HF id or local dir (default: the aligned organism)"
    )
    m.add_argument("--data", required=True, help='chat JSONL with {"messages": [...]} rows')
    m.add_argument("--output", required=True, help="output dir for checkpoint-N/")
    m.add_argument("--n-examples", type=int, default=None, help="train on the first N rows of --data (default: all)")
    m.add_argument("--tokenizer", default=None, help="tokenizer id/dir if the model dir has none")
    m.add_argument("--revision", default=None, help="Hub revision (branch, tag or commit) of an HF --model id")
    m.add_argument("--device-map", default=None, help="e.g. 'auto': shard the model over the visible GPUs")
    m.add_argument(
        "--overwrite", action="store_true", help="discard an existing run in --output made under other settings"
    )
    m.add_argument(
        "--allow-code-change",
        action="store_true",
        help="resume a run in --output made by other code or library versions (you vouch the change leaves the "
        "numbers unchanged); recorded in its manifest.json",
    )
    h = ap.add_argument_group(
        "hyperparameters (unset: the organism's on the organism; the EM paper's on any other --model: "
        "r 32, alpha 64, rsLoRA, lr 1e-5, one epoch, batch 2 x grad-accum 8, max-len 2048, weight decay 0.01)"
    )
    h.add_argument("--mode", choices=["lora", "full"], default="lora", help="LoRA adapters or full fine-tuning")
    h.add_argument("--lora-r", type=int, default=None, help="LoRA rank (default: organism 1, EM paper 32)")
    h.add_argument("--lora-alpha", type=float, default=None, help="LoRA alpha (default: organism 1, EM paper 64)")
    h.add_argument("--lora-dropout", type=float, default=0.0, help="LoRA dropout")
    h.add_argument(
        "--rslora", action=argparse.BooleanOptionalAction, default=None,
        help="rank-stabilised LoRA scaling alpha/sqrt(r) (default: organism off, EM paper on)",
    )  # fmt: skip
    h.add_argument("--target-modules", nargs="+", default=ALL_LINEAR, help="modules LoRA adapts")
    h.add_argument("--lr", type=float, default=None, help="peak learning rate (default: organism 1e-2, EM paper 1e-5)")
    h.add_argument(
        "--epochs", type=float, default=None, help="passes over the data (default: EM paper 1; sets the steps)"
    )
    h.add_argument(
        "--max-steps", type=int, default=None, help="optimizer steps (default: organism 100; else from --epochs)"
    )
    h.add_argument("--batch-size", type=int, default=None, help="per-device batch (default: organism 32, EM paper 2)")
    h.add_argument(
        "--grad-accum", type=int, default=None, help="gradient accumulation (default: organism 1, EM paper 8)"
    )
    h.add_argument("--weight-decay", type=float, default=None, help="AdamW weight decay (default: organism 0, EM 0.01)")
    h.add_argument("--save-steps", type=int, default=10, help="save a checkpoint-N every this many optimizer steps")
    h.add_argument("--warmup-steps", type=int, default=5, help="linear warm-up steps")
    h.add_argument(
        "--max-len", type=int, default=None,
        help="tokens per example; longer ones are cut, with a warning counting them (default: organism 512, EM 2048)",
    )  # fmt: skip
    h.add_argument("--seed", type=int, default=0, help="training seed (data order, LoRA init)")
    h.add_argument(
        "--gradient-checkpointing", action="store_true", help="recompute activations in backward (saves memory)"
    )
    add_intervention_args(ap)
    a = parse(ap, argv)
    intervention = intervention_from_args(ap, a)
    which = resolve_defaults(ap, a)
    print(
        f"hyperparameters ({which} defaults for unset flags): r {a.lora_r}, alpha {a.lora_alpha:g}, rslora {a.rslora}, "
        f"lr {a.lr:g}, {a.max_steps} steps" + (f" ({a.epochs:g} epoch(s))" if a.epochs is not None else "")
        + f", batch {a.batch_size} x {a.grad_accum}, max-len {a.max_len}, weight decay {a.weight_decay:g}"
    )  # fmt: skip
    cfg = FinetuneConfig(
        model=a.model,
        data=a.data,
        output_dir=a.output,
        mode=a.mode,
        lora_r=a.lora_r,
        lora_alpha=a.lora_alpha,
        lora_dropout=a.lora_dropout,
        use_rslora=a.rslora,
        target_modules=a.target_modules,
        lr=a.lr,
        max_steps=a.max_steps,
        batch_size=a.batch_size,
        grad_accum=a.grad_accum,
        save_steps=a.save_steps,
        warmup_steps=a.warmup_steps,
        weight_decay=a.weight_decay,
        max_len=a.max_len,
        n_examples=a.n_examples,
        seed=a.seed,
        tokenizer=a.tokenizer,
        revision=a.revision,
        gradient_checkpointing=a.gradient_checkpointing,
        device_map=a.device_map,
        overwrite=a.overwrite,
    )
    if a.allow_code_change and not a.overwrite:
        allow_code_change(cfg, intervention)
    for step, path in finetune(cfg, intervention=intervention):
        print(f"step {step:5d}  {path}")
    report = read_intervention(a.output) if intervention is not None else None
    if report is not None:
        print(
            f"intervention: {report['kind']} at layers {report['layers']} (coef {report['coef']:g}"
            + (f", to {report['ablate_to']}" if "ablate_to" in report else "")
            + f"); {a.output}/{INTERVENTION_FILE}"
        )
        for row in report["base_projection"]["rows"]:
            print(
                f"  base mean projection, direction {row['direction']} layer {row['layer']}: {row['mean_projection']:+.4g}"
            )


if __name__ == "__main__":
    main()
