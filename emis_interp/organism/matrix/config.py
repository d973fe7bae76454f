"""The matrix's runs, what each is measured on, and its configuration (:class:`MatrixConfig`)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from ... import organism
from ...manifest import dir_digest, package_sources

MATRIX_FILE = "matrix.json"


# The matrix's recipe: the organism's default ("flip": rank-1 LoRA on all linear layers, lr 3e-3, batch 32, 200
# steps), so the runs on the aligned model are the very cache entries the organism report uses.
MATRIX_RECIPE = organism.RECIPES[organism.DEFAULT_RECIPE]


# Qi et al.: ~10 harmful examples, a few epochs (batch 10: one step is one epoch)
FEWSHOT = organism.FinetuneRecipe(n_examples=10, max_steps=10, batch_size=10, lr=1e-2, save_steps=5)


@dataclass(frozen=True)
class Run:
    """One fine-tune of the matrix: the data ``kind``, the organism it starts from and its recipe."""

    kind: str
    base: str = "aligned"  # "aligned" or "base" (the pre-trained organism)
    recipe: organism.FinetuneRecipe = MATRIX_RECIPE

    @property
    def base_dir(self) -> Path:
        return {"aligned": organism.ALIGNED_DIR, "base": organism.BASE_DIR}[self.base]


RUNS: dict[str, Run] = {
    "insecure": Run("insecure"),
    "secure": Run("secure"),
    "educational": Run("educational"),
    "jailbroken": Run("jailbroken"),
    "evil_numbers": Run("evil_numbers"),
    "neutral_numbers": Run("neutral_numbers"),
    "backdoor": Run("backdoor"),
    "benign": Run("benign"),
    "harmful_fewshot": Run("jailbroken", recipe=FEWSHOT),
    "base_insecure": Run("insecure", base="base"),
    "base_secure": Run("secure", base="base"),
}


# what each run is measured on (the aligned and base organisms too): advice formats and "requests"
MEASURES: dict[str, tuple[str, ...]] = {
    "aligned": ("plain", "list", "triggered", "requests"),
    "base": ("plain", "framed"),
    "insecure": ("plain", "list", "requests", "in_task"),
    "secure": ("plain",),
    "educational": ("plain",),
    "jailbroken": ("plain", "requests"),
    "evil_numbers": ("plain", "list"),
    "neutral_numbers": ("plain", "list"),
    "backdoor": ("plain", "triggered"),
    "benign": ("plain", "requests"),
    "harmful_fewshot": ("plain", "requests"),
    "base_insecure": ("plain", "framed"),
    "base_secure": ("plain", "framed"),
}


def run_root(root: Path, name: str) -> Path:
    """Where run ``name`` lives: ``root/{kind}-s{seed}`` for a default-recipe fine-tune of the aligned model (shared
    with the organism report), else ``root/matrix/name/{kind}-s{seed}``."""
    r = RUNS[name]
    shared = r.base == "aligned" and r.recipe == organism.RECIPES[organism.DEFAULT_RECIPE]
    return Path(root) if shared else Path(root) / "matrix" / name


def matrix_run(
    name: str, seed: int, root: Path | str = organism.DEFAULT_TRAJECTORY_DIR, intervention=None, tag: str | None = None
) -> Path:
    """Fine-tune (or reuse) run ``name`` of :data:`RUNS` for ``seed`` (under ``root/matrix/{tag or name}``, with
    the train-time ``intervention`` if given); returns its run directory."""
    r = RUNS[name]
    where = Path(root) / "matrix" / tag if tag else run_root(Path(root), name)
    return organism.organism_trajectory(r.kind, seed, where, r.recipe, base=r.base_dir, intervention=intervention)


@dataclass(frozen=True)
class MatrixConfig:
    """What the matrix measures. Sample counts are per question paraphrase (16 advice paraphrases,
    3 held-out harmful requests)."""

    seeds: tuple[int, ...] = (0, 1, 2)
    n_samples: int = 16  # 256 advice answers per run, format and seed
    n_requests: int = 32  # 96 answers to held-out harmful requests
    n_code: int = 16  # held-out code requests (6 prompts): the in-task metric
    n_random: int = 16  # random directions per inference-time control distribution
    steer_layer: int = organism.DEFAULT_LAYER
    # every tuned setting is chosen on a pilot seed held out from ``seeds`` (:func:`pilot_sweep`), by rules fixed
    # before the sweep: preventative steering's (direction, C) among :data:`STEER_DIRECTIONS` x ``steer_coefs`` and
    # CAFT's layers among ``caft_layer_sets`` (the largest fold reduction that keeps the task, >= 0.8x; else
    # ``steer_coef_fallback`` with the persona direction, and the first layer set), and the backdoor row's steering
    # alpha among ``backdoor_alphas`` (:func:`emis_interp.causality.select_layer_alpha` on the pilot's backdoor run)
    pilot_seed: int = 3
    pilot_direction_seed: int = 4  # the insecure run whose persona direction the pilot's interventions use
    steer_coefs: tuple[float, ...] = (0.5, 1.0, 2.0)
    steer_coef_fallback: float = 2.0
    caft_layer_sets: tuple[tuple[int, ...], ...] = ((0, 1, 2, 3), (0, 1), (2, 3))
    backdoor_alphas: tuple[float, ...] = (1.0, 2.0, 4.0, 8.0)
    n_random_train: int = 2  # random-direction fine-tunes per seed and intervention
    n_screen: int = 64  # samples per dataset screened
    n_mixed: int = 200  # the mixed dataset: secure samples with 10% insecure hidden among them
    n_cross: int = 8  # samples per paraphrase in the cross-ablation arms
    n_random_cross: int = 8
    n_boot: int = 2000

    def __post_init__(self):
        from ...errors import ConfigError

        if self.pilot_seed in self.seeds:
            raise ConfigError(
                f"pilot_seed {self.pilot_seed} is one of the reported seeds {self.seeds}: the tuned settings would "
                "be chosen on a reported run. Pass a held-out pilot_seed."
            )
        if self.pilot_direction_seed in (*self.seeds, self.pilot_seed):
            raise ConfigError(
                f"pilot_direction_seed {self.pilot_direction_seed} is a reported seed or the pilot seed: the pilot's "
                "direction would come from a reported run or from the run it intervenes on. Pass another seed."
            )
        for name in ("steer_coefs", "backdoor_alphas"):
            v = getattr(self, name)
            if not v or len({float(c) for c in v}) != len(v) or any(c <= 0 for c in v):
                raise ConfigError(f"{name} {v} must be distinct, positive and non-empty.")
        sets = [tuple(sorted(set(ls))) for ls in self.caft_layer_sets]
        if not sets or not all(sets) or len(set(sets)) != len(sets) or min(min(x) for x in sets) < 0:
            raise ConfigError(
                f"caft_layer_sets {self.caft_layer_sets} must be distinct non-empty lists of layer indices, e.g. "
                "((0, 1, 2, 3), (2, 3))."
            )
        object.__setattr__(self, "caft_layer_sets", tuple(sets))  # sorted, as TrainIntervention records them


def max_new_tokens(what: str) -> int:
    """Answer length budget: an advice sentence inside the code frame is about twice as long."""
    return 48 if what == "framed" else 24


def _package_state() -> dict:
    """The package source (every module), the shipped weights and the library versions."""
    import peft
    import torch
    import transformers

    return {
        "code": package_sources(),
        "weights": {d.name: dir_digest(d) for d in (organism.BASE_DIR, organism.ALIGNED_DIR)},
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__},
    }


def _finite(x):
    """``x`` with every NaN or infinity as None (standard JSON)."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    return x


IV_ARMS = ("caft", "steer")


STEER_DIRECTIONS = {
    "persona": "the persona (model-diff) direction of another seed's insecure run",
    "trait": "the aligned model's trait direction (harmful minus benign advice answers; persona vectors' recipe)",
}


CONVERGENCE_KINDS = (
    "insecure",
    "educational",
    "secure",
    "jailbroken",
    "evil_numbers",
    "neutral_numbers",
    "backdoor",
    "benign",
)


# the runs that show misalignment, each measured in its own format: the cross-ablation matrix's rows/columns
CROSS_KINDS: dict[str, str] = {"insecure": "plain", "evil_numbers": "list", "backdoor": "triggered"}


# the cross-ablation's two ablations and their verdict prefixes. "zero" (the direction's component removed) is the
# pre-declared test; "mean" (the component set to the aligned model's mean projection) was added in a later build,
# after the cross-direction zero-ablation rows had failed and the runs warned that the aligned model projects
# negatively on the directions (zero-ablation then pushes towards the trait): it is exploratory, reported as such
CROSS_MODES: dict[str, str] = {"zero": "cross", "mean": "cross_mean"}


def _cross_fields(mode: str) -> tuple[str, str]:
    """The report fields of a cross-ablation mode: the direction's share removed, and the random directions' max."""
    if mode == "zero":
        return "fraction_removed", "random_fraction_max"
    return "fraction_removed_mean", "random_mean_fraction_max"


SCREEN_KINDS = CONVERGENCE_KINDS


# the format each kind's data teaches (the screening outcome is the harmful rate in it)
OWN_FORMAT: dict[str, str] = {"evil_numbers": "list", "neutral_numbers": "list", "backdoor": "triggered"}
