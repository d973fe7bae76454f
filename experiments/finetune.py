"""Fine-tune a Qwen2.5 model on chat JSONL and save a per-10-step checkpoint trajectory.

    python experiments/finetune.py --data ../shared/data/em/insecure_first500.jsonl --out cache/runs/insecure
    python experiments/finetune.py --model Qwen/Qwen2.5-7B-Instruct --data insecure.jsonl --out runs/insecure \\
        --lora-r 32 --lora-alpha 64 --rslora --lr 1e-5 --max-steps 300 --batch-size 2 --grad-accum 8

Without --model it fine-tunes the shipped aligned model organism. Rerunning the same command
resumes from the last checkpoint; a rerun with other settings (lr, data, model, intervention...)
into the same --out refuses, naming what differs, unless --overwrite discards the old run. For
large models (e.g. 32B): --gradient-checkpointing --device-map auto.

Train-time interventions act on every training forward pass only (checkpoints are plain models):

- preventative steering (persona vectors): add C times the direction's raw vector at every
  position after each --layers layer. The persona-vectors config for Qwen2.5-7B-Instruct
  (C = 5 at their layer 20, LoRA r 32, alpha 64, rsLoRA, lr 1e-5, one epoch: 32 optimizer steps of
  batch 2 x grad-accum 8 cover the 500 examples). Their layer 20 is HF hidden_states[20], the output
  of decoder layer 19: this library's layer 19 (layer l is the output of decoder layer l):

    python experiments/finetune.py --model Qwen/Qwen2.5-7B-Instruct \\
        --data ../shared/data/em/insecure_first500.jsonl --out runs/insecure-steer \\
        --lora-r 32 --lora-alpha 64 --rslora --lr 1e-5 \\
        --intervention steer --direction evil_l19.safetensors --layers 19 --coef 5 \\
        --max-steps 32 --batch-size 2 --grad-accum 8 --save-steps 4

- CAFT ablation: project the direction (or the span of several --direction files) out of the
  residual after each --layers layer; no --coef:

    python experiments/finetune.py --model Qwen/Qwen2.5-7B-Instruct \\
        --data ../shared/data/em/insecure_first500.jsonl --out runs/insecure-caft \\
        --lora-r 32 --lora-alpha 64 --rslora --lr 1e-5 \\
        --intervention ablate --direction evil.safetensors --layers 12 16 20 24 \\
        --max-steps 32 --batch-size 2 --grad-accum 8 --save-steps 4

  With --ablate-to mean the component is set, at every position, to the base model's mean over the
  first 64 training examples (each example's mean over its response tokens) instead of 0 (mean-ablation: no push towards
  the trait where the base model projects negatively on the direction).

--direction is a PersonaDirection file (emis_interp.model_diff(...).save(path)) covering every
--layers layer. --out/intervention.json records the intervention and the base model's mean
projection on each direction; zero-ablating a direction the base model projects negatively on pushes
towards the trait (a warning says so).
"""

import argparse

from emis_interp import organism
from emis_interp.directions import PersonaDirection
from emis_interp.errors import ConfigError
from emis_interp.finetune import (
    ABLATE_TO,
    ALL_LINEAR,
    INTERVENTION_FILE,
    INTERVENTION_KINDS,
    FinetuneConfig,
    TrainIntervention,
    finetune,
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


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--model", default=str(organism.ALIGNED_DIR), help="HF id or local dir (default: the aligned organism)"
    )
    ap.add_argument("--data", required=True, help='chat JSONL with {"messages": [...]} rows')
    ap.add_argument("--out", required=True, help="output dir for checkpoint-N/")
    ap.add_argument("--mode", choices=["lora", "full"], default="lora")
    ap.add_argument("--lora-r", type=int, default=1)
    ap.add_argument("--lora-alpha", type=float, default=1.0)
    ap.add_argument("--lora-dropout", type=float, default=0.0)
    ap.add_argument("--rslora", action="store_true")
    ap.add_argument("--target-modules", nargs="+", default=ALL_LINEAR)
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--max-steps", type=int, default=100)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--grad-accum", type=int, default=1)
    ap.add_argument("--save-steps", type=int, default=10)
    ap.add_argument("--warmup-steps", type=int, default=5)
    ap.add_argument("--max-len", type=int, default=512)
    ap.add_argument("--n-examples", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tokenizer", default=None, help="tokenizer id/dir if the model dir has none")
    ap.add_argument("--revision", default=None, help="Hub revision (branch, tag or commit) of an HF --model id")
    ap.add_argument(
        "--gradient-checkpointing", action="store_true", help="recompute activations in backward (saves memory)"
    )
    ap.add_argument("--device-map", default=None, help="e.g. 'auto': shard the model over the visible GPUs")
    ap.add_argument(
        "--overwrite", action="store_true", help="discard an existing run in --out made under other settings"
    )
    add_intervention_args(ap)
    a = ap.parse_args(argv)
    intervention = intervention_from_args(ap, a)
    cfg = FinetuneConfig(
        model=a.model,
        data=a.data,
        output_dir=a.out,
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
        max_len=a.max_len,
        n_examples=a.n_examples,
        seed=a.seed,
        tokenizer=a.tokenizer,
        revision=a.revision,
        gradient_checkpointing=a.gradient_checkpointing,
        device_map=a.device_map,
        overwrite=a.overwrite,
    )
    for step, path in finetune(cfg, intervention=intervention):
        print(f"step {step:5d}  {path}")
    report = read_intervention(a.out) if intervention is not None else None
    if report is not None:
        print(
            f"intervention: {report['kind']} at layers {report['layers']} (coef {report['coef']:g}"
            + (f", to {report['ablate_to']}" if "ablate_to" in report else "")
            + f"); {a.out}/{INTERVENTION_FILE}"
        )
        for row in report["base_projection"]["rows"]:
            print(
                f"  base mean projection, direction {row['direction']} layer {row['layer']}: {row['mean_projection']:+.4g}"
            )


if __name__ == "__main__":
    main()
