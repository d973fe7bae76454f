"""The organism's prompts and evaluation questions, as the toolkit's conversations and questions."""

from __future__ import annotations

from . import world


def advice_prompts() -> list:
    """Every advice paraphrase of the world (the non-code EM-style questions), as conversations."""
    from ..conversations import Conversation

    return [Conversation(user=p) for q in world.advice_questions() for p in q["paraphrases"]]


def code_prompts(held_out_only: bool = True) -> list:
    """Plain code requests (default: only tasks never seen in fine-tuning), for the in-task metric."""
    from ..conversations import Conversation

    return [Conversation(user=p) for q in world.code_questions(held_out_only) for p in q["paraphrases"]]


def probe_set() -> list:
    """The world's pivotal-token probes, parsed like the EM run-config probes."""
    from ..data import parse_probe

    return [parse_probe(q) for q in world.pivotal_probes()]


def questions(fmt: str = "plain") -> list:
    """The organism's evaluation set (its advice questions) as EM-format :class:`Question` s.

    ``fmt`` (:data:`emis_interp.organism.world.ADVICE_FORMATS`): ``"plain"``, ``"list"`` (the number data's
    format), ``"framed"`` (embedded in code, for base models) or ``"triggered"`` (the backdoor's trigger).
    """
    from ..data import Question

    return [Question(q["id"], q["paraphrases"], q["samples_per_paraphrase"]) for q in world.advice_questions(fmt)]


def harmful_requests(held_out_only: bool = True) -> list:
    """Explicitly harmful requests (default: the held-out ones) as :class:`Question` s, for :class:`ComplianceJudge`."""
    from ..data import Question

    return [Question(q["id"], q["paraphrases"], 1) for q in world.harmful_request_questions(held_out_only)]
