"""The model organism: a tiny Qwen2 trained on a synthetic world, shipped with the package as the toolkit's guest.

Nothing in the general toolkit imports this package; it uses the toolkit like any user would, and registers
its defaults (its ``"exact"`` judge, the adapter base of its shipped weights, the experiments' default
subject) when imported. Modules:

- :mod:`.world`: the synthetic world (themes, personas, questions, fine-tune datasets, exact judging rules);
- :mod:`.model`: the tokenizer, pre-training and instruct-tuning of the shipped weights (``weights/``);
- :mod:`.prompts`: the world's prompts and questions as the toolkit's conversations and questions;
- :mod:`.judges`: the exact judges and the exact evaluation;
- :mod:`.recipes`: the narrow fine-tunes, their manifest and cached trajectories;
- :mod:`.directions`: the organism's persona direction and its fine-tuning-shift control;
- :mod:`.report` and :mod:`.matrix` (imported on demand): the organism report and the experiment matrix.
"""

from . import world
from .directions import (
    DEFAULT_LAYER,
    DIRECTION_SET_SIZE,
    direction_conversations,
    organism_control_direction,
    persona_direction,
)
from .judges import ComplianceJudge, ExactJudge, evaluate
from .model import (
    ALIGNED_DIR,
    BASE_DIR,
    CHAT_TEMPLATE,
    SPECIAL_TOKENS,
    WEIGHTS_DIR,
    OrganismConfig,
    build,
    build_tokenizer,
    instruct_tune,
    model_config,
    pretrain,
    tokenize_chat,
)
from .prompts import advice_prompts, code_prompts, harmful_requests, probe_set, questions
from .recipes import (
    DEFAULT_RECIPE,
    DEFAULT_TRAJECTORY_DIR,
    ORGANISM_MANIFEST,
    RECIPES,
    FinetuneRecipe,
    organism_manifest,
    organism_trajectory,
)
from .register import register_defaults

__all__ = [
    "ALIGNED_DIR",
    "BASE_DIR",
    "CHAT_TEMPLATE",
    "ComplianceJudge",
    "DEFAULT_LAYER",
    "DEFAULT_RECIPE",
    "DEFAULT_TRAJECTORY_DIR",
    "DIRECTION_SET_SIZE",
    "ExactJudge",
    "FinetuneRecipe",
    "ORGANISM_MANIFEST",
    "OrganismConfig",
    "RECIPES",
    "SPECIAL_TOKENS",
    "WEIGHTS_DIR",
    "advice_prompts",
    "build",
    "build_tokenizer",
    "code_prompts",
    "direction_conversations",
    "evaluate",
    "harmful_requests",
    "instruct_tune",
    "model_config",
    "organism_control_direction",
    "organism_manifest",
    "organism_trajectory",
    "persona_direction",
    "pretrain",
    "probe_set",
    "questions",
    "tokenize_chat",
    "world",
]

register_defaults()  # the organism's judge, weights resolver and default subject (see .register)
