"""Where the persona lives and how it forms: every view of issue #13 from the command line.

    python experiments/persona_views.py                              # the organism's insecure run (seed 0)
    python experiments/persona_views.py --run runs/insecure --base Qwen/Qwen2.5-7B-Instruct \\
        --direction persona.safetensors --layers 14 --direction-data ../shared/data/em/insecure_first500.jsonl

For a LoRA trajectory (``checkpoint-N`` dirs) and a persona direction it writes to --output:

- ``lora_dynamics.html/.json/.csv``: A/B norms, local cosine, PCA of the B vectors, comp score and
  the detected transition step (no model needed: read from the adapter files);
- ``attribution.html`` / ``attribution_growth.html``: each head's and MLP's write projected on the
  direction (direct attribution over response tokens) at the final checkpoint, and across checkpoints;
- ``logit_lens.html``: the top and bottom tokens of ``unembed(final_norm(v))`` per layer;
- ``token_projections.html``: each response token's projection on the direction at the --layers layer;
- ``persona_direction.gguf``: the direction as a llama.cpp control vector (layers >= 1).

On the organism the direction defaults to the model-diff of the final insecure checkpoint.
"""

import json
from pathlib import Path

from emis_interp import organism
from emis_interp.attribution import attribution_trajectory, component_attribution
from emis_interp.cache import DEFAULT_CACHE_DIR, atomic_write_text
from emis_interp.cliargs import parse, parser
from emis_interp.conversations import load_jsonl
from emis_interp.directions import PersonaDirection
from emis_interp.lens import logit_lens
from emis_interp.monitor import token_projections
from emis_interp.plots import attribution_growth, attribution_heatmap, lora_dynamics_figure, save_figure
from emis_interp.trajectory import Trajectory
from emis_interp.weights import lora_dynamics


def main(argv=None) -> dict:
    ap = parser(__doc__)
    ap.add_argument("--run", type=Path, help="a LoRA run dir with checkpoint-N dirs (default: organism insecure-s0)")
    ap.add_argument("--base", help="base model of the LoRA run (default: read from adapter_config.json)")
    ap.add_argument("--direction", type=Path, help="a saved PersonaDirection (required on a real run)")
    ap.add_argument("--layers", type=int, nargs=1, help="the layer of the per-token view (default: organism layer 2)")
    ap.add_argument(
        "--direction-data", type=Path,
        help="chat JSONL with responses on which the direction is read: attribution and the token view "
        "(default on the organism: its direction conversations)",
    )  # fmt: skip
    ap.add_argument("--n-examples", type=int, default=32, help="conversations read from --direction-data")
    ap.add_argument("--every", type=int, default=5, help="attribution growth: every N-th checkpoint")
    ap.add_argument("--output", type=Path, default=DEFAULT_CACHE_DIR / "views", help="output directory")
    a = parse(ap, argv)
    on_organism = a.run is None
    if not on_organism and (a.direction is None or a.direction_data is None or a.layers is None):
        raise SystemExit("error: on a real run pass --direction FILE, --direction-data JSONL and --layers L")
    run = a.run or organism.organism_trajectory("insecure", seed=0)
    traj = Trajectory.from_dir(run, base=a.base)
    if traj.kind != "lora":
        raise SystemExit(f"error: {run} holds full checkpoints; the weight-space views need a LoRA run")
    out = a.output
    out.mkdir(parents=True, exist_ok=True)

    dyn = lora_dynamics(traj)
    dyn.save(out)
    files = save_figure(lora_dynamics_figure(dyn, title=f"LoRA dynamics of {traj.name}"), out / "lora_dynamics")

    model, tok = traj.load()
    traj.goto(model, len(traj) - 1)
    if a.direction is not None:
        direction = PersonaDirection.load(a.direction)
    else:
        from emis_interp import load_model

        aligned, _ = load_model(organism.ALIGNED_DIR)
        direction = organism.persona_direction(aligned, model, tok)
    layer = a.layers[0] if a.layers is not None else organism.DEFAULT_LAYER
    convs = (
        load_jsonl(a.direction_data, limit=a.n_examples)
        if a.direction_data
        else organism.direction_conversations(a.n_examples, seed=7)
    )

    attr = component_attribution(model, tok, convs, direction)
    files += save_figure(
        attribution_heatmap(attr, title="Direct attribution on the persona direction"), out / "attribution"
    )
    idx = sorted({*range(0, len(traj), max(1, a.every)), len(traj) - 1})
    growth = attribution_trajectory(traj, model, tok, convs, direction, indices=idx)
    files += save_figure(attribution_growth(growth), out / "attribution_growth")
    traj.goto(model, len(traj) - 1)

    lens = logit_lens(model, tok, direction)
    atomic_write_text(out / "logit_lens.html", lens._repr_html_())
    tp = token_projections(model, tok, convs[:8], direction, layer)
    tp.save(out / "token_projections.html")
    gguf_layers = [lay for lay in direction.layers if lay >= 1]
    direction.to_gguf(out / "persona_direction.gguf", layers=gguf_layers)
    summary = {
        "run": str(run),
        "transition_step": dyn.transition_step,
        "pc2_turn_step": dyn.pc2_turn_step,
        "top_components": attr.top(3),
        "files": [str(f) for f in files]
        + [str(out / n) for n in ("logit_lens.html", "token_projections.html", "persona_direction.gguf")],
    }
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=1, default=str))
    print(f"transition step (weight space): {dyn.transition_step}; PC2 turn: {dyn.pc2_turn_step}")
    print(f"top components by attribution: {attr.top(3)}")
    print(f"views written to {out}")
    return summary


if __name__ == "__main__":
    main()
