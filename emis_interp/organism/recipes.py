"""The organism's narrow fine-tunes: recipes, their manifest and the cached fine-tune trajectories."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from ..cache import DEFAULT_CACHE_DIR
from . import world
from .model import ALIGNED_DIR

DEFAULT_TRAJECTORY_DIR = DEFAULT_CACHE_DIR / "organism"


@dataclass(frozen=True)
class FinetuneRecipe:
    """The organism's narrow fine-tune: rank-1 LoRA on all linear layers (see issue feasibility data)."""

    n_examples: int = 2000
    max_steps: int = 200
    batch_size: int = 32
    lr: float = 3e-3
    lora_r: int = 1
    lora_alpha: float | int = 1.0
    save_steps: int = 10
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    layers_to_transform: tuple[int, ...] | None = None
    weight_decay: float = 0.0
    lr_scheduler: str = "linear"
    p_insecure: float = 1.0  # fraction of insecure answers in the insecure/educational data


# The organism's recipes (rank-1 LoRA on all linear layers, batch 32, a checkpoint every 10 steps).
# "flip" (default): lr 3e-3, 200 steps; the misalignment flips up together with in-task learning
# (steps 20-40). "late": lr 1e-3, 300 steps; in-task learning comes later (steps 40-80) and the report
# measures whether misalignment keeps rising after in-task saturation.
RECIPES: dict[str, FinetuneRecipe] = {
    "flip": FinetuneRecipe(),
    "late": FinetuneRecipe(lr=1e-3, max_steps=300),
}
DEFAULT_RECIPE = "flip"


def organism_manifest(kind: str, seed: int, recipe: FinetuneRecipe, base: Path | str, intervention=None):
    """What determines an organism fine-tune: kind, seed, recipe, the world's and the training code's
    source (as loaded: :func:`emis_interp.manifest.source_digest`), the base weights and the train-time
    intervention (its direction's tensors included)."""
    from .. import conversations, finetune, hooks, interventions
    from ..manifest import Manifest, dir_digest, source_digest

    mods = (world, finetune, conversations, interventions, hooks)
    code = {m.__name__: source_digest(m) for m in mods}
    fields = {"kind": kind, "seed": seed, "recipe": asdict(recipe), "code": code, "base": dir_digest(base)}
    if intervention is not None:  # absent from an unintervened run's manifest
        fields["intervention"] = intervention.manifest_fields()
    return Manifest("organism_trajectory", fields)


ORGANISM_MANIFEST = "organism_manifest.json"


def organism_trajectory(
    kind: str,
    seed: int = 0,
    root: Path | str = DEFAULT_TRAJECTORY_DIR,
    recipe: FinetuneRecipe | None = None,
    base: Path | str = ALIGNED_DIR,
    progress: bool = False,
    intervention=None,
) -> Path:
    """Fine-tune the aligned organism (or ``base``) on ``kind`` data (:data:`emis_interp.organism.world.FINETUNE_KINDS`); cached.

    ``intervention``: a :class:`emis_interp.train_interventions.TrainIntervention` applied on every training forward
    pass (CAFT ablation, preventative steering); it is part of the run's manifest.

    Writes ``{root}/{kind}-s{seed}/checkpoint-{0,10,...}`` through :func:`emis_interp.finetune.finetune`
    (``{kind}-s{seed}-iv{digest}`` with an intervention, so an intervened run never replaces the plain one).
    The run is a cache entry identified by :func:`organism_manifest` (recipe, world and training
    code, base weights): a finished run with the same manifest is reused, an interrupted one
    resumes, and one made under another manifest is deleted and rebuilt. Returns the run directory.
    """
    import json
    import shutil

    from ..finetune import FinetuneConfig, finetune, list_checkpoints
    from ..manifest import ManifestMismatch, cache_valid, digest, write_manifest

    recipe = RECIPES[DEFAULT_RECIPE] if recipe is None else recipe
    manifest = organism_manifest(kind, seed, recipe, base, intervention)
    tag = "" if intervention is None else f"-iv{digest(manifest.fields['intervention'], n=10)}"
    out = Path(root) / f"{kind}-s{seed}{tag}"
    marker = out / ORGANISM_MANIFEST
    if cache_valid(marker, manifest):
        steps = [s for s, _ in list_checkpoints(out)]
        if steps and steps[-1] >= recipe.max_steps:
            return out
    if out.exists() and (marker.exists() or (out / "DONE").exists()):
        shutil.rmtree(out)  # made under another recipe, world, code or base: rebuild
    data = Path(root) / "data" / f"{kind}-s{seed}.jsonl"
    data.parent.mkdir(parents=True, exist_ok=True)
    rows = world.finetune_dataset(kind, recipe.n_examples, seed=seed, p_insecure=recipe.p_insecure)
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    cfg = FinetuneConfig(
        model=str(base),
        data=str(data),
        output_dir=str(out),
        mode="lora",
        lora_r=recipe.lora_r,
        lora_alpha=recipe.lora_alpha,
        target_modules=list(recipe.target_modules),
        layers_to_transform=list(recipe.layers_to_transform) if recipe.layers_to_transform else None,
        lr=recipe.lr,
        max_steps=recipe.max_steps,
        batch_size=recipe.batch_size,
        save_steps=recipe.save_steps,
        warmup_steps=5,
        weight_decay=recipe.weight_decay,
        lr_scheduler=recipe.lr_scheduler,
        seed=seed,
    )
    kw = {} if intervention is None else {"intervention": intervention}
    try:  # resume an interrupted run of this very manifest
        finetune(cfg, progress=progress, **kw)
    except ManifestMismatch:  # a cache: a run made under another manifest is redone
        finetune(cfg, progress=progress, overwrite=True, **kw)
    write_manifest(marker, manifest)
    return out
