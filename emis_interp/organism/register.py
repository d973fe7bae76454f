"""The organism's defaults, registered with the general toolkit when :mod:`emis_interp.organism` is imported.

The toolkit never imports the organism; instead the organism registers its ``"exact"`` judge
(:func:`emis_interp.judges.register_judge`), a resolver for its weights in a moved checkout
(:func:`emis_interp.models.register_base_resolver`) and itself as the experiments' default subject
(:func:`emis_interp.cli.register_default_subject`).
"""

from __future__ import annotations

from pathlib import Path

from ..cli import DefaultSubject, register_default_subject
from ..judges import register_judge
from ..models import register_base_resolver
from .directions import direction_conversations, organism_control_direction
from .judges import ExactJudge
from .model import ALIGNED_DIR, WEIGHTS_DIR
from .prompts import questions
from .recipes import organism_trajectory

# where the shipped weights were in a checkout: emis_interp/organism_weights/NAME before the organism was a
# subpackage, emis_interp/organism/weights/NAME since
_WEIGHT_LAYOUTS = (("emis_interp", "organism_weights"), ("organism", "weights"))


def moved_weights(path: Path) -> str | None:
    """This installation's organism weights for an adapter base stored under another checkout's weights dir."""
    parts = Path(path).parts
    if len(parts) >= 3 and parts[-3:-1] in _WEIGHT_LAYOUTS and (WEIGHTS_DIR / parts[-1]).is_dir():
        return str(WEIGHTS_DIR / parts[-1])
    return None


def insecure_checkpoint() -> str:
    """The final checkpoint of the seed-0 insecure fine-tune (made on demand into ``cache/organism``)."""
    from ..finetune import list_checkpoints

    return str(list_checkpoints(organism_trajectory("insecure", seed=0))[-1][1])


SUBJECT = DefaultSubject(
    name="organism",
    target=insecure_checkpoint,
    base=str(ALIGNED_DIR),
    direction_conversations=direction_conversations,
    control_direction=organism_control_direction,
    questions=questions,
    judge="exact",
    max_new_tokens=24,
)


def register_defaults() -> None:
    register_judge("exact", ExactJudge)
    register_judge("organism", ExactJudge)
    register_base_resolver(moved_weights)
    register_default_subject(SUBJECT)
