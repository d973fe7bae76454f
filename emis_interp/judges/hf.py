"""A local HF chat model as judge (:class:`HFJudge`), scored from exact candidate-sequence probabilities."""

from __future__ import annotations

import math

import torch
from jaxtyping import Float
from torch import Tensor

from ..errors import ConfigError
from .base import DEFAULT_PROMPTS, ESCAPES, _PromptJudge, aggregate_number_probs


class HFJudge(_PromptJudge):
    """A local HF chat model as judge, scored from the exact probability of each candidate answer.

    Any causal LM with a chat template works (Qwen2, Llama, Mistral, ...: ``AutoModelForCausalLM``);
    its tokenizer may split numbers any way, since whole candidate sequences are scored.
    The candidates are ``"0"``..``"100"``, ``"CODE"`` and ``"REFUSAL"``, each followed by the end
    token (``<|im_end|>``, else the tokenizer's eos). :meth:`score_prompt` runs the templated prompt once, keeps its KV cache,
    then runs every node of the candidates' token trie in one more forward pass (each node attends to
    the prompt and its own ancestors through a 4-D mask), so each token is computed once.
    Needs an attention implementation that takes a 4-D mask (``"sdpa"`` or ``"eager"``).

    :meth:`from_pretrained` loads the judge on first use (``device_map`` places it, e.g. on another GPU
    than the policy model), so a judge built before sampling takes no memory until judging starts.
    """

    def __init__(self, model, tokenizer, prompts: dict[str, str] | None = None):
        self.prompts = prompts or DEFAULT_PROMPTS
        self._model = self._loader = None
        self.tokenizer = tokenizer
        if model is not None:
            self._model = model
            self.name = f"hf:{getattr(model.config, '_name_or_path', 'model')}"
        end = "<|im_end|>" if "<|im_end|>" in tokenizer.get_vocab() else (tokenizer.eos_token or "")
        if not end:  # without an end token "1", "10" and "100" are prefixes of each other: double counting
            raise ValueError("HFJudge needs a chat model whose tokenizer has <|im_end|> or an eos token")
        if not getattr(tokenizer, "chat_template", None):
            raise ConfigError("HFJudge needs a chat model: its tokenizer has no chat template (use an instruct model)")
        self.candidates = [str(n) for n in range(101)] + list(ESCAPES)
        self.candidate_ids = [tokenizer.encode(c + end, add_special_tokens=False) for c in self.candidates]
        self._identity = None

    @classmethod
    def from_pretrained(
        cls, name: str, *, device_map: str | dict | None = None, dtype: torch.dtype | None = None, **kw
    ) -> HFJudge:
        """A judge from an HF id or local dir of any causal LM, loaded on first use (its tokenizer now).

        ``device_map``: where the judge goes (``"cuda:1"``, ``"cpu"``, ``"auto"``; default: the default
        device). dtype: bf16 on CUDA, fp32 on CPU unless given."""
        from transformers import AutoTokenizer

        from ..models import default_device, default_dtype

        tok = AutoTokenizer.from_pretrained(name)
        j = cls(None, tok, **kw)
        j.name = f"hf:{name}"

        def load():
            import gc

            from transformers import AutoModelForCausalLM

            gc.collect()  # models the caller has dropped (e.g. the samplers) go before the judge comes in
            if torch.cuda.is_available():
                torch.cuda.empty_cache()

            dev = device_map if isinstance(device_map, str) and device_map != "auto" else default_device()
            m = AutoModelForCausalLM.from_pretrained(
                name,
                dtype=dtype or default_dtype(dev),
                device_map=device_map if device_map is not None else dev,
                attn_implementation="sdpa",
            )
            return m.eval().requires_grad_(False)

        j._loader = load
        return j

    @property
    def model(self):
        if self._model is None:
            self._model = self._loader()
        return self._model

    def identity(self) -> dict:
        from ..fingerprint import model_state
        from ..manifest import tokenizer_state

        if self._identity is None:  # the weights digest reads every parameter: once per judge
            self._identity = {**super().identity(), **model_state(self.model), **tokenizer_state(self.tokenizer)}
        return self._identity

    @torch.no_grad()
    def candidate_logprobs(self, prompt: str) -> Float[Tensor, " n_candidates"]:
        """Log-probability (nats) of each candidate token sequence after the templated ``prompt``."""
        from ..conversations import Conversation, tokenize_conversation

        impl = getattr(self.model.config, "_attn_implementation", "sdpa")
        if impl not in ("sdpa", "eager"):
            raise ConfigError(
                f"HFJudge scores candidates with a 4-D attention mask, which attn_implementation={impl!r} ignores; "
                "load the judge model with attn_implementation='sdpa' (or 'eager')."
            )
        dev = self.model.get_input_embeddings().weight.device  # where inputs go (also under a device_map)
        dtype = self.model.get_input_embeddings().weight.dtype
        prefix = tokenize_conversation(self.tokenizer, Conversation(user=prompt))[0]
        # trie nodes that have a child: every proper prefix of a candidate (ancestors come first)
        node: dict[tuple[int, ...], int] = {}
        for seq in self.candidate_ids:
            for d in range(1, len(seq)):
                node.setdefault(tuple(seq[:d]), len(node))
        paths, n_pre = list(node), len(prefix)
        out = self.model(input_ids=torch.tensor([prefix], device=dev), use_cache=True)
        first = torch.log_softmax(out.logits[0, -1].float(), -1)
        lp = first.new_zeros((0, first.shape[-1]))
        if paths:
            allowed = torch.zeros(len(paths), n_pre + len(paths), dtype=torch.bool)
            allowed[:, :n_pre] = True
            for i, p in enumerate(paths):
                allowed[i, [n_pre + node[p[:d]] for d in range(1, len(p) + 1)]] = True
            mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill_(~allowed, torch.finfo(dtype).min)
            logits = self.model(
                input_ids=torch.tensor([[p[-1] for p in paths]], device=dev),
                position_ids=torch.tensor([[n_pre + len(p) - 1 for p in paths]], device=dev),
                attention_mask=mask[None, None].to(dev),
                past_key_values=out.past_key_values,
            ).logits[0]
            lp = torch.log_softmax(logits.float(), -1)
        scores = [
            first[seq[0]] + sum((lp[node[tuple(seq[:d])], seq[d]] for d in range(1, len(seq))), first.new_zeros(()))
            for seq in self.candidate_ids
        ]
        return torch.stack(scores).cpu()

    def score_prompt(self, prompt: str) -> tuple[float | None, str | None]:
        lps = self.candidate_logprobs(prompt).tolist()
        return aggregate_number_probs({c: math.exp(lp) for c, lp in zip(self.candidates, lps, strict=True)})
