"""Judges behind one interface: ``judge.score(question, answer, q) -> {"aligned": x, "coherent": y, "label": l}``
and its batch form ``judge.score_many(items, out_file=...) -> list[dict]``.

Scores are 0..100 or None (no score). Three judges:

- :class:`OpenAIJudge`: an OpenAI-compatible chat API (official ``openai`` client, configurable
  ``base_url``, so a local vLLM server works). As in the EM paper, it asks for one completion
  token with the top-20 logprobs and scores them with :func:`aggregate_number_probs`; a judge whose
  tokenizer writes numbers digit by digit (Qwen) is detected and scored over the digit tree
  (:meth:`OpenAIJudge.digit_tree`). Requests run ``max_concurrency`` at a time, with the server's
  Retry-After or exponential backoff and jitter on 429 / 5xx / timeouts.
- :class:`HFJudge`: a local HF chat model (any causal LM), scored the same way from the exact sequence
  probability of each candidate answer ``"0"``..``"100"``, ``"CODE"``, ``"REFUSAL"`` (one prefix pass,
  then one pass over the candidates' token trie).
- registered judges (:func:`register_judge`), e.g. the model organism's ``"exact"`` judge.

:meth:`Judge.score_many` writes each judged row to a JSONL file as soon as it is judged, with a
:class:`~emis_interp.manifest.Manifest` of the judge beside it (``<file>.manifest.json``); a rerun
skips the rows already there, and a rerun with another judge (model, server, prompts, number
reading) refuses. An item the judge fails on is recorded as a failed row and judging goes on; a
rerun retries it, and rates leave it out (:func:`split_failed`). See ``docs/judges.md``.

API keys are read from the environment (``OPENAI_API_KEY`` or ``api_key_env``) and never stored
in results, manifests or ``repr``.
"""

from __future__ import annotations

from ..errors import ConfigError
from .base import (
    DEFAULT_PROMPTS,
    ESCAPES,
    FAILED_NOTE,
    MAX_CONSECUTIVE_FAILURES,
    MIN_NUMBER_MASS,
    SCORING,
    Judge,
    JudgeItemError,
    JudgeRequestError,
    aggregate_number_probs,
    number_token,
    split_failed,
)
from .hf import HFJudge
from .openai_api import NUMBER_PROBE, OpenAIJudge

__all__ = [
    "DEFAULT_PROMPTS",
    "ESCAPES",
    "FAILED_NOTE",
    "JUDGES",
    "MAX_CONSECUTIVE_FAILURES",
    "MIN_NUMBER_MASS",
    "NUMBER_PROBE",
    "SCORING",
    "HFJudge",
    "Judge",
    "JudgeItemError",
    "JudgeRequestError",
    "OpenAIJudge",
    "aggregate_number_probs",
    "get_judge",
    "number_token",
    "register_judge",
    "split_failed",
]

# Judges a guest package registers by name (the organism's "exact"), so that this module never imports it.
JUDGES: dict = {}


def register_judge(name: str, factory) -> None:
    """Make ``get_judge(name)`` return ``factory()``."""
    JUDGES[name] = factory


def get_judge(spec: str | None, *, device_map: str | dict | None = None, **kw):
    """``"openai:MODEL"``, ``"hf:PATH_OR_ID"`` or a registered name (``"exact"``: the model organism's, registered
    when :mod:`emis_interp.organism` is imported). There is no default: ``None`` is an error.

    ``device_map`` places an ``hf:`` judge (e.g. ``"cuda:1"`` away from the policy model, ``"auto"``);
    ``kw`` go to :class:`OpenAIJudge`."""
    if spec is None:
        raise ConfigError(
            "no judge given: pass 'openai:MODEL' (with base_url= for a local vLLM server) or 'hf:MODEL'; on the model "
            "organism pass 'exact' (import emis_interp.organism, which registers it)"
        )
    if spec in JUDGES:
        return JUDGES[spec]()
    kind, _, name = spec.partition(":")
    if kind == "hf":
        return HFJudge.from_pretrained(name, device_map=device_map)
    if device_map is not None:
        raise ConfigError(f"--judge-device places a local hf: judge; judge {spec!r} runs on its server")
    if kind == "openai":
        return OpenAIJudge(model=name or "gpt-4o-2024-08-06", **kw)
    if spec in ("exact", "organism"):
        raise ConfigError(
            f"judge {spec!r} is the model organism's: import emis_interp.organism first (it registers it)"
        )
    raise ValueError(f"unknown judge {spec!r}; use 'openai:MODEL' (with --judge-base-url), 'hf:MODEL' or 'exact'")
