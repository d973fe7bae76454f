"""The OpenAI-compatible chat-API judge (:class:`OpenAIJudge`): single-token or digit-tree scoring, retries
with Retry-After or backoff."""

from __future__ import annotations

import math
import os
import random
import threading
import time

from ..errors import ConfigError
from .base import DEFAULT_PROMPTS, JudgeItemError, JudgeRequestError, _PromptJudge, aggregate_number_probs, number_token

NUMBER_PROBE = "Write the number 85 and nothing else."  # how does the judge's tokenizer write numbers?

_sleep = time.sleep  # the backoff's sleep (tests record it)


class OpenAIJudge(_PromptJudge):
    """An OpenAI-compatible chat-completions judge (``base_url`` for vLLM etc.).

    **How numbers are read** (``numbers``). The EM paper's judge (GPT-4o) writes every score 0..100
    as one token, so one completion token's top-20 logprobs are the score distribution
    (:func:`aggregate_number_probs`). Qwen, Mistral and other tokenizers split numbers into single
    digits ("85" is "8", "5"): read that way, every score would fall in 0..9. ``numbers="auto"``
    (default) asks the judge once to write ``85`` (:data:`NUMBER_PROBE`) and looks at how the number in
    its answer is tokenized:

    - ``"whole"`` (one token, e.g. ``"85"``): the EM paper's single-token scoring, unchanged.
    - ``"digits"`` (``"8"``, ``"5"``): the digit tree (:meth:`digit_tree`): the probability of each
      number is the product of its digits' next-token probabilities, each read after the assistant
      message is prefilled with the digits before it. That prefill is not part of the OpenAI API:
      it uses vLLM's ``continue_final_message`` (a server without it gets a :class:`ConfigError`
      naming the alternatives). A number ends at the first non-digit token, as a whole-number token
      counts whatever follows it. Branches below ``digit_eps`` probability are not expanded
      (their mass is left out, as non-number mass is), which bounds the requests per prompt.

    The digit mode is part of :meth:`identity`, so rows judged one way are never reused for the other.

    ``score_many`` runs ``max_concurrency`` items at a time. A request that fails with 408/409/429,
    a 5xx, a timeout or a connection error is retried up to ``max_retries`` times, after the
    server's ``Retry-After`` (capped at ``max_retry_after``) or else ``backoff * 2**k`` seconds
    (capped at ``max_backoff``, with jitter: between half and all of it); then that item fails
    (:class:`JudgeItemError`). A 400/413/422 fails the item at once (e.g. a content filter); other
    errors (401, 403, 404: the key, the model, the URL) raise :class:`JudgeRequestError` at once.
    """

    def __init__(
        self,
        model: str = "gpt-4o-2024-08-06",
        base_url: str | None = None,
        api_key_env: str = "OPENAI_API_KEY",
        timeout: float | int = 30.0,
        max_retries: int = 6,
        prompts: dict[str, str] | None = None,
        max_concurrency: int = 32,
        backoff: float = 1.0,
        max_backoff: float = 60.0,
        max_retry_after: float = 300.0,
        numbers: str = "auto",
        digit_eps: float = 1e-3,
    ):
        from openai import OpenAI  # its connection pool (1000) is larger than any sensible max_concurrency

        key = os.environ.get(api_key_env) or ("EMPTY" if base_url else None)
        if key is None:
            raise RuntimeError(f"set {api_key_env} (or pass base_url for a local server that needs no key)")
        if max_concurrency < 1 or max_retries < 0:
            raise ValueError(f"need max_concurrency >= 1 and max_retries >= 0, got {max_concurrency}, {max_retries}")
        if numbers not in ("auto", "whole", "digits"):
            raise ValueError(f"numbers must be 'auto', 'whole' or 'digits', got {numbers!r}")
        if not 0 < digit_eps < 0.1:
            raise ValueError(f"digit_eps must be in (0, 0.1), got {digit_eps}")
        self.model, self.base_url, self.prompts = model, base_url, prompts or DEFAULT_PROMPTS
        self.name = f"openai:{model}"
        self.max_concurrency, self.max_retries, self.backoff, self.max_backoff = (
            max_concurrency,
            max_retries,
            backoff,
            max_backoff,
        )
        self.max_retry_after, self.digit_eps = max_retry_after, digit_eps
        self._numbers = None if numbers == "auto" else numbers
        self._send_seed = True
        self._probe_lock = threading.Lock()
        self._client = OpenAI(api_key=key, base_url=base_url, timeout=timeout, max_retries=0)  # retries: ours

    def __repr__(self) -> str:  # never the key
        return f"OpenAIJudge(model={self.model!r}, base_url={self.base_url!r}, max_concurrency={self.max_concurrency})"

    @property
    def numbers(self) -> str:
        """``"whole"`` or ``"digits"``: how this judge's tokenizer writes numbers (probed once if ``"auto"``)."""
        with self._probe_lock:  # score_many's threads may ask at once: probe once
            if self._numbers is None:
                self._numbers = self._probe_numbers()
        return self._numbers

    def identity(self) -> dict:
        ident = {**super().identity(), "model": self.model, "base_url": self.base_url, "top_logprobs": 20}
        if self.numbers == "digits":  # whole-number scoring keeps its old identity: those rows stay valid
            ident.update(numbers="digit-tree", digit_eps=self.digit_eps)
        return ident

    def _where(self) -> str:
        return f"judge {self.name} at {self.base_url or 'api.openai.com'}"

    def _probe_numbers(self) -> str:
        r = self._complete(NUMBER_PROBE, max_tokens=4, top_logprobs=1, item=False)
        toks = [t.token for t in (r.choices[0].logprobs.content or [])]
        i = next((k for k, t in enumerate(toks) if any(c.isdigit() for c in t)), None)
        first = toks[i].strip() if i is not None else ""
        if len(first) >= 2 and first.isdigit():  # a number in one token (e.g. "85")
            return "whole"
        if _is_digit(first) and i + 1 < len(toks) and toks[i + 1][:1].isdigit():  # "8", "5"
            return "digits"
        raise ConfigError(
            f"{self._where()}: asked to write 85, it answered with tokens {toks!r}, so how it tokenizes numbers is "
            "unknown. Pass numbers='whole' (one token per number, e.g. GPT-4o) or numbers='digits' (Qwen: one token "
            "per digit), or use another judge model."
        )

    def _complete(self, prompt: str, prefix: str = "", max_tokens: int = 1, top_logprobs: int = 20, item=True):
        """One chat completion with logprobs; ``prefix`` prefills the assistant message (vLLM's
        ``continue_final_message``). ``item``: a failure fails this item only (:class:`JudgeItemError`)."""
        import openai

        messages = [{"role": "user", "content": prompt}]
        extra = None
        if prefix:
            messages.append({"role": "assistant", "content": prefix})
            extra = {"continue_final_message": True, "add_generation_prompt": False}
        last = None
        for attempt in range(self.max_retries + 1):
            wait = None
            try:
                return self._create(
                    model=self.model,
                    messages=messages,
                    max_tokens=max_tokens,
                    temperature=0,
                    logprobs=True,
                    top_logprobs=top_logprobs,
                    extra_body=extra,
                )
            except openai.APIStatusError as e:
                code = e.status_code
                if code not in (408, 409, 429) and code < 500:
                    if prefix and code in (400, 422):
                        raise ConfigError(
                            f"{self._where()} writes numbers digit by digit, and scoring them needs the assistant "
                            f"message prefilled (vLLM's continue_final_message), which this server refused (HTTP "
                            f"{code}: {e.message}). Serve the judge with vLLM >= 0.6, or use --judge hf:MODEL (exact "
                            "candidate sequences), or a judge that writes each number as one token (e.g. GPT-4o)."
                        ) from e
                    msg = f"{self._where()} refused the request (HTTP {code}: {e.message})"
                    if item and code in (400, 413, 422):  # this item's content (e.g. a content filter)
                        raise JudgeItemError(msg) from e
                    raise JudgeRequestError(
                        f"{msg}; check the model name, the API key and that the server supports logprobs/top_logprobs."
                    ) from e
                last, wait = e, _retry_after(e.response.headers)
            except openai.APIConnectionError as e:  # timeouts included
                last = e
            if attempt < self.max_retries:
                if wait is not None:
                    _sleep(min(self.max_retry_after, wait))
                else:
                    d = min(self.max_backoff, self.backoff * 2**attempt)
                    _sleep(d * random.uniform(0.5, 1.0))
        raise (JudgeItemError if item else JudgeRequestError)(
            f"{self._where()}: request failed {self.max_retries + 1} times "
            f"(last: {type(last).__name__}: {last}). Lower max_concurrency (now {self.max_concurrency}), raise "
            "max_retries/backoff/timeout, or check the server; rerunning with the same out_file resumes."
        ) from last

    def _create(self, **kw):
        """``chat.completions.create`` with ``seed=0``, or without it once a server rejected it (a seed
        does not change logprobs at temperature 0, so the scores and the identity are the same)."""
        import openai

        if not self._send_seed:
            return self._client.chat.completions.create(**kw)
        try:
            return self._client.chat.completions.create(**kw, seed=0)
        except openai.BadRequestError as e:
            if "seed" not in str(e.message).lower():
                raise
            self._send_seed = False
            return self._client.chat.completions.create(**kw)

    def _next_token_probs(self, prompt: str, prefix: str = "") -> dict[str, float]:
        r = self._complete(prompt, prefix)
        probs: dict[str, float] = {}
        for t in r.choices[0].logprobs.content[0].top_logprobs:
            probs[t.token] = probs.get(t.token, 0.0) + math.exp(t.logprob)
        return probs

    def digit_tree(self, prompt: str) -> dict[str, float]:
        """Probability of each number 0..100 (keys ``"0"``..``"100"``) written digit by digit, plus the
        first token's other tokens (for the CODE / REFUSAL label), for :func:`aggregate_number_probs`.

        ``P("85") = P("8") * P("5" | "8") * P(no digit | "85")``: each node's next-token distribution
        is read with the digits so far prefilled. Digit strings that are no score (above 100 or longer
        than 3 digits) are non-number mass, as in the paper. A branch below ``digit_eps`` is not expanded.
        """
        first = self._next_token_probs(prompt)
        out = {t: p for t, p in first.items() if not _is_digit(t) and number_token(t) is None}
        stack = [(d, p) for d, p in first.items() if _is_digit(d)]
        while stack:
            s, p = stack.pop()
            if p < self.digit_eps or len(s) > 3 or int(s) > 100:
                continue  # too unlikely to expand, or no score whatever follows
            nxt = {t: q for t, q in self._next_token_probs(prompt, s).items() if _is_digit(t)}
            out[s] = out.get(s, 0.0) + p * max(0.0, 1.0 - sum(nxt.values()))
            stack += [(s + d, p * q) for d, q in nxt.items()]
        return out

    def score_prompt(self, prompt: str) -> tuple[float | None, str | None]:
        if self.numbers == "digits":
            return aggregate_number_probs(self.digit_tree(prompt))
        return aggregate_number_probs(self._next_token_probs(prompt))


def _is_digit(tok: str) -> bool:
    return len(tok) == 1 and tok in "0123456789"


def _retry_after(headers) -> float | None:
    """Seconds a server asks to wait (``retry-after-ms``, ``Retry-After`` in seconds or as an HTTP date)."""
    if headers is None:
        return None
    try:
        if headers.get("retry-after-ms") is not None:
            return max(0.0, float(headers["retry-after-ms"]) / 1000)
        v = headers.get("retry-after")
        if v is None:
            return None
        try:
            return max(0.0, float(v))
        except ValueError:
            from email.utils import parsedate_to_datetime

            return max(0.0, parsedate_to_datetime(v).timestamp() - time.time())
    except (TypeError, ValueError, OverflowError):
        return None
