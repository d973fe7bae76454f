"""Shared command-line plumbing for experiments/*.py: model/direction/question resolution.

Without ``--model``/``--checkpoint`` every experiment runs on the registered default subject
(:func:`register_default_subject`): the model organism registers itself when
:mod:`emis_interp.organism` is imported (the experiments import it), with the aligned organism
as the base, the final checkpoint of the seed-0 insecure fine-tune (built on demand into
``cache/organism``) as the fine-tuned model, and their model-diff as the direction. With
``--model``/``--checkpoint`` nothing falls back to it: ``--questions``, ``--judge`` and
``--direction`` or ``--direction-data`` are required. This module never imports the organism.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from .data import load_questions
from .directions import PersonaDirection


@dataclass(frozen=True)
class DefaultSubject:
    """What the experiments run on without ``--model``/``--checkpoint``; registered by a guest package."""

    name: str
    target: Callable[[], str]  # the fine-tuned model (made on demand)
    base: str  # the aligned model of its model-diff
    direction_conversations: Callable[[], list]  # the model-diff's conversations
    control_direction: Callable  # (tokenizer, layers) -> the control fine-tune's PersonaDirection
    questions: Callable[[], list]  # the evaluation questions
    judge: str  # a registered judge's name (judges.register_judge)
    max_new_tokens: int


_DEFAULT_SUBJECT: list[DefaultSubject] = []


def register_default_subject(subject: DefaultSubject) -> None:
    """Make ``subject`` what :func:`resolve` uses without ``--model``/``--checkpoint``."""
    _DEFAULT_SUBJECT[:] = [subject]


def default_subject() -> DefaultSubject:
    if not _DEFAULT_SUBJECT:
        raise SystemExit(
            "error: pass --model or --checkpoint (no default subject is registered: "
            "import emis_interp.organism to run on the model organism)"
        )
    return _DEFAULT_SUBJECT[0]


def add_common(ap: argparse.ArgumentParser) -> None:
    g = ap.add_argument_group("models (default: the model organism)")
    g.add_argument("--model", help="model to intervene on: HF id, local dir or LoRA adapter dir")
    g.add_argument(
        "--checkpoint", help="a fine-tuned checkpoint (e.g. runs/insecure/checkpoint-300); adapters apply to --base"
    )
    g.add_argument(
        "--base",
        help="aligned reference model for the model-diff (HF id or dir); for a LoRA --checkpoint it overrides "
        "the adapter's base (the aligned model is then that base with the adapter disabled: no second copy)",
    )
    g.add_argument("--direction", type=Path, help="a saved PersonaDirection (.safetensors) instead of computing one")
    g.add_argument(
        "--direction-data",
        type=Path,
        help="chat JSONL on which to compute the model-diff (required on a real model unless --direction)",
    )
    g.add_argument("--device-map", default=None, help="passed to accelerate, e.g. 'auto' for multi-GPU models")
    e = ap.add_argument_group("evaluation")
    e.add_argument(
        "--layers",
        type=int,
        nargs="+",
        help="steering: layers to intervene at; ablation: the one layer whose direction is removed (default: organism "
        "layer 2)",
    )
    e.add_argument("--questions", type=Path, help="EM-format YAML (e.g. ../shared/data/em/first_plot_questions.yaml)")
    e.add_argument("--samples", type=int, default=32, help="samples per question paraphrase")
    e.add_argument(
        "--max-new-tokens", type=int, default=None, help="default: 24 on the organism, 600 (the EM paper's) otherwise"
    )
    e.add_argument(
        "--judge",
        default=None,
        help="'openai:MODEL' or 'hf:MODEL' (required on a real model); 'exact' is the organism's",
    )
    e.add_argument("--judge-base-url", default=None, help="OpenAI-compatible server URL (e.g. a local vLLM)")
    e.add_argument(
        "--judge-device", default=None, help="where an hf: judge goes, e.g. cuda:1 (away from the policy), cpu, auto"
    )
    c = ap.add_argument_group("controls (a control is a distribution, never one draw)")
    c.add_argument("--n-random", type=int, default=16, help="random directions of equal per-layer norm")
    c.add_argument(
        "--match-multipliers",
        type=float,
        nargs="*",
        default=[0.5, 0.75, 1.25, 1.5, 2.0],
        help="steering: random directions also at alpha x these, for the coherence-matched comparison (none: omit)",
    )
    c.add_argument("--n-match", type=int, default=4, help="random directions per matched multiplier")
    c.add_argument(
        "--control-direction",
        type=Path,
        help="a control fine-tune's model-diff direction (PersonaDirection file), rescaled to equal norm; "
        "default on the organism: the secure run's (seed 0), on a real model: none",
    )
    e.add_argument("--seed", type=int, default=0, help="sampling seed (and the random directions')")
    e.add_argument("--batch-size", type=int, default=256, help="sequences per generate call")
    e.add_argument("--output", type=Path, default=None, help="output directory")


def _is_adapter_dir(target: str) -> bool:
    return (Path(target).expanduser() / "adapter_config.json").is_file()


def check_real_model_args(args) -> None:
    """On a real model nothing falls back to the organism: name every missing flag at once."""
    missing = []
    if args.questions is None:
        missing.append("--questions FILE (EM-format YAML, e.g. ../shared/data/em/first_plot_questions.yaml)")
    if args.judge is None:
        missing.append(
            "--judge openai:MODEL or hf:MODEL (the organism's exact judge scores real answers as incoherent)"
        )
    elif args.judge in ("exact", "organism"):
        missing.append(f"--judge openai:MODEL or hf:MODEL (--judge {args.judge} only understands the organism)")
    if args.direction is None and args.direction_data is None:
        missing.append(
            "--direction FILE (a saved PersonaDirection) or --direction-data JSONL (chats for the model-diff)"
        )
    if missing:
        raise SystemExit("error: on a real model (--model/--checkpoint) pass " + "; ".join(missing))


def needed_layers(args, n_layers: int) -> list[int]:
    """The layers a computed direction must cover: those named by ``--layers``/``--select-layers`` (all when none).

    Capturing every layer of a 32B model to steer at one costs ``n_layers`` times the activations.
    """
    wanted = {*(getattr(args, "layers", None) or []), *(getattr(args, "select_layers", None) or [])}
    bad = sorted(x for x in wanted if not 0 <= x < n_layers)
    if bad:
        raise SystemExit(
            f"error: layers {bad} are out of range for a model with {n_layers} layers; use 0..{n_layers - 1}"
        )
    return sorted(wanted) or list(range(n_layers))


def resolve(args) -> dict:
    """Load models, direction, questions and judge from parsed args. Returns a dict of them.

    On a real model (``--model``/``--checkpoint``) ``--questions``, ``--judge`` and ``--direction``
    or ``--direction-data`` are required. For a LoRA adapter target the model-diff's aligned model
    is the same loaded model with its adapter disabled (one copy of the base in memory); ``--base``
    then overrides the adapter's base. For a full checkpoint ``--base`` loads the aligned model.
    """
    from .conversations import load_jsonl
    from .directions import model_diff
    from .judges import get_judge
    from .models import _looks_like_path, load_model

    on_organism = not (args.model or args.checkpoint)
    target = args.checkpoint or args.model
    subject = default_subject() if on_organism else None
    if on_organism:
        target = subject.target()
    else:
        check_real_model_args(args)
    is_adapter = _is_adapter_dir(target)
    base_id = args.base or (subject.base if on_organism else None)
    missing_path = _looks_like_path(target) and not Path(target).expanduser().exists()  # load_model names it
    if args.direction is None and not is_adapter and base_id is None and not missing_path:
        raise SystemExit("error: a model-diff direction needs --base ALIGNED_MODEL (or pass --direction FILE)")
    if is_adapter:
        model, tok = load_model(target, base=args.base, device_map=args.device_map)
    else:
        model, tok = load_model(target, device_map=args.device_map)
    if args.direction is not None:
        direction = PersonaDirection.load(args.direction)
    else:
        convs = load_jsonl(args.direction_data) if args.direction_data else subject.direction_conversations()
        layers = needed_layers(args, model.config.num_hidden_layers)
        if is_adapter:
            # the aligned model is the base under the adapter: no second copy. No activation cache here:
            # the disabled-adapter view shares the fine-tuned model's parameters.
            direction = cached_lora_model_diff(model, tok, convs, layers, target, args.base)
        else:
            base, _ = load_model(base_id, device_map=args.device_map)
            direction = model_diff(base, model, tok, convs, layers, "mean_response")
            del base
    control = None
    if getattr(args, "control_direction", None) is not None:
        control = PersonaDirection.load(args.control_direction)
    elif on_organism and args.direction is None:
        control = subject.control_direction(tok, direction.layers)
    qs = load_questions(args.questions) if args.questions else subject.questions()
    spec = (args.judge or subject.judge) if on_organism else args.judge
    judge = get_judge(
        spec,
        **({"base_url": args.judge_base_url} if args.judge_base_url else {}),
        **({"device_map": args.judge_device} if getattr(args, "judge_device", None) else {}),
    )
    return {
        "model": model,
        "tokenizer": tok,
        "direction": direction,
        "control": control,
        "questions": qs,
        "judge": judge,
        "target": target,
        "on_organism": on_organism,
        "max_new_tokens": args.max_new_tokens or (subject.max_new_tokens if on_organism else 600),
    }


def cached_lora_model_diff(model, tok, convs, layers, adapter_dir, base=None, cache_dir=None) -> PersonaDirection:
    """The model-diff of a LoRA checkpoint (adapter disabled -> enabled), cached under a manifest.

    The manifest holds what determines it: the adapter's files, the base (its files when local), the loaded
    weights' digest (base and adapter, whatever names the base), the tokenizer,
    the conversations, the layers, dtype, device, library versions and the capture code. A mismatch recomputes.
    """
    import json

    import peft
    import transformers

    from . import capture, directions, hooks
    from .cache import DEFAULT_CACHE_DIR
    from .conversations import prompt_set_hash
    from .directions import model_diff
    from .fingerprint import weights_digest
    from .manifest import Manifest, cache_valid, dir_digest, source_digest, tokenizer_state, write_manifest
    from .models import _looks_like_path, resolve_adapter_base

    stored = json.loads((Path(adapter_dir) / "adapter_config.json").read_text()).get("base_model_name_or_path")
    base_id = resolve_adapter_base(base or stored, adapter_dir)
    p = next(model.parameters())
    manifest = Manifest(
        "lora-model-diff",
        {
            "adapter": dir_digest(adapter_dir),
            "base": dir_digest(base_id) if _looks_like_path(base_id) and Path(base_id).is_dir() else base_id,
            # the weights in memory (base and adapter): a base named by a Hub id or a .gguf file keys on its content
            "weights": weights_digest(model),
            **tokenizer_state(tok),
            "conversations": prompt_set_hash(convs),
            "responses": [c.response for c in convs],
            "layers": list(layers),
            "reduction": "mean_response",
            "dtype": str(p.dtype),
            "device": p.device.type,
            "versions": [torch.__version__, transformers.__version__, peft.__version__],
            "code": source_digest(directions, capture, hooks),
        },
    )
    out = Path(cache_dir or DEFAULT_CACHE_DIR / "model_diff") / manifest.key
    if cache_valid(out, manifest) and (out / "direction.safetensors").is_file():
        return PersonaDirection.load(out / "direction.safetensors")
    # no activation cache inside: the disabled-adapter view shares the fine-tuned model's parameters
    d = model_diff(AdapterDisabled(model), model, tok, convs, layers, "mean_response", cache_dir=None)
    out.mkdir(parents=True, exist_ok=True)
    d.save(out / "direction.safetensors")
    write_manifest(out, manifest)
    return d


class AdapterDisabled(torch.nn.Module):
    """A view of a PEFT model whose forward runs with its adapters disabled (the base model).

    Shares every parameter with the wrapped model, so it costs no memory. ``base_model`` is the
    wrapped PeftModel, so :func:`emis_interp.models.decoder_layers` (and hooks) find its layers.
    """

    def __init__(self, peft_model):
        super().__init__()
        self.base_model = peft_model

    @property
    def config(self):
        return self.base_model.config

    def forward(self, *args, **kwargs):
        with self.base_model.disable_adapter():
            return self.base_model(*args, **kwargs)
