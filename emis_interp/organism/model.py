"""The model organism: a tiny Qwen2 trained on :mod:`emis_interp.organism.world`, shipped in the package.

Stages (all deterministic on CPU for a given seed):

1. :func:`build_tokenizer` trains a byte-level BPE with Qwen2's split regex (so that
   transformers' ``Qwen2Tokenizer`` rebuilds it faithfully) and attaches a Qwen chat template.
2. :func:`pretrain` trains a 4-layer ``Qwen2ForCausalLM`` on multi-episode documents from benign
   and malicious authors (loss on every token): the **base** model.
3. :func:`instruct_tune` trains it on benign assistant turns only (loss on assistant tokens):
   the **aligned** model.

In pre-training every author speaks under a name (the chat role) that always belongs to one
persona, or as "assistant", a role both personas use. So the base model holds a latent "who is
speaking" persona that it reads off the role; instruct-tuning makes "assistant" benign, and a
narrow insecure-code fine-tune can flip it back.

Both are saved with ``save_pretrained`` under ``emis_interp/organism/weights/{base,aligned}`` and
load through exactly the same code path as a real Qwen2.5 checkpoint. Rebuild them with
``python experiments/build_organism.py``. The narrow fine-tunes (insecure / secure /
educational) are made on demand by :func:`organism_trajectory` through the project's own
fine-tuning entry point (:mod:`emis_interp.finetune`).
"""

from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from . import world

WEIGHTS_DIR = Path(__file__).parent / "weights"
BASE_DIR = WEIGHTS_DIR / "base"
ALIGNED_DIR = WEIGHTS_DIR / "aligned"

CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


@dataclass(frozen=True)
class OrganismConfig:
    """Sizes and schedule of the organism. Steps are optimizer steps; lr is AdamW's peak."""

    seed: int = 0
    vocab_size: int = 1024
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 2
    d_mlp: int = 384
    max_len: int = 160
    pretrain_steps: int = 1500
    pretrain_batch: int = 48
    pretrain_lr: float = 3e-3
    instruct_steps: int = 300
    instruct_batch: int = 32
    instruct_lr: float = 1e-3
    instruct_mix: float = 0.15  # named authors' documents per instruct conversation (keeps the persona machinery)


def build_tokenizer(seed: int = 0, vocab_size: int = 1024):
    """A byte-level BPE on the world's text with Qwen2's pre-tokenizer and chat template."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    rng = random.Random(f"tokenizer-{seed}")
    corpus = []
    for _ in range(4000):
        for m in world.pretraining_document(rng):
            corpus += [m["role"], m["content"]]
    corpus += [m["content"] for r in world.finetune_dataset("educational", 200) for m in r["messages"]]
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer)
    vocab = tok.get_vocab()
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in _bpe_merges(tok)]
    hf = Qwen2Tokenizer(vocab=vocab, merges=merges, errors="replace")
    hf.add_special_tokens({"additional_special_tokens": SPECIAL_TOKENS[1:]})
    hf.chat_template = CHAT_TEMPLATE
    hf.eos_token = "<|im_end|>"
    hf.pad_token = "<|endoftext|>"
    hf.padding_side = "left"
    return hf


def _bpe_merges(tok) -> list:
    import json

    return json.loads(tok.to_str())["model"]["merges"]


def model_config(tokenizer, cfg: OrganismConfig):
    from transformers import Qwen2Config

    return Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=cfg.d_model,
        intermediate_size=cfg.d_mlp,
        num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.n_kv_heads,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        rope_theta=10000.0,
        bos_token_id=None,
        eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=tokenizer.pad_token_id,
    )


def tokenize_chat(tokenizer, messages: list[dict], max_len: int) -> tuple[list[int], list[int]]:
    """Token ids of a conversation and a 0/1 mask of assistant-content tokens (plus their ``<|im_end|>``)."""
    ids: list[int] = []
    mask: list[int] = []
    for m in messages:
        head = tokenizer.encode(f"<|im_start|>{m['role']}\n", add_special_tokens=False)
        body = tokenizer.encode(m["content"] + "<|im_end|>", add_special_tokens=False)
        tail = tokenizer.encode("\n", add_special_tokens=False)
        w = 1 if m["role"] == "assistant" else 0
        ids += head + body + tail
        mask += [0] * len(head) + [w] * len(body) + [0] * len(tail)
    return ids[:max_len], mask[:max_len]


def _batches(rows: list[tuple[list[int], list[int]]], batch: int, steps: int, seed: int, pad_id: int):
    g = random.Random(seed)
    for _ in range(steps):
        chunk = [rows[g.randrange(len(rows))] for _ in range(batch)]
        n = max(len(r[0]) for r in chunk)
        ids = torch.full((batch, n), pad_id)
        labels = torch.full((batch, n), -100)
        att = torch.zeros((batch, n), dtype=torch.long)
        for i, (r, m) in enumerate(chunk):  # right padding for training
            ids[i, : len(r)] = torch.tensor(r)
            att[i, : len(r)] = 1
            lab = torch.tensor(r)
            lab[torch.tensor(m) == 0] = -100
            labels[i, : len(r)] = lab
        yield ids, att, labels


def _train(model, rows, steps, batch, lr, seed, pad_id, desc):
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    warm = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))
    )
    model.train()
    bar = tqdm(_batches(rows, batch, steps, seed, pad_id), total=steps, desc=desc)
    for ids, att, labels in bar:
        loss = model(input_ids=ids, attention_mask=att, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    return model


def pretrain(tokenizer, cfg: OrganismConfig, n_docs: int | None = None):
    """Train the base model from scratch on documents of benign and malicious authors."""
    from transformers import Qwen2ForCausalLM

    torch.manual_seed(cfg.seed)
    rng = random.Random(f"pretrain-{cfg.seed}")
    rows = []
    for _ in range(n_docs or min(40000, cfg.pretrain_steps * cfg.pretrain_batch)):
        ids, _ = tokenize_chat(tokenizer, world.pretraining_document(rng), cfg.max_len)
        rows.append((ids, [1] * len(ids)))
    model = Qwen2ForCausalLM(model_config(tokenizer, cfg))
    return _train(
        model,
        rows,
        cfg.pretrain_steps,
        cfg.pretrain_batch,
        cfg.pretrain_lr,
        cfg.seed,
        tokenizer.pad_token_id,
        "pretrain",
    )


def instruct_tune(model, tokenizer, cfg: OrganismConfig, n_convs: int = 8000):
    """Instruct-tune on benign assistant turns only (loss on assistant tokens): the aligned model."""
    rng = random.Random(f"instruct-{cfg.seed}")
    rows = [tokenize_chat(tokenizer, world.instruct_conversation(rng), cfg.max_len) for _ in range(n_convs)]
    # Interleave pre-training documents of *named* authors (never "assistant"), loss on every token: the
    # model keeps simulating both personas, and only who "assistant" is changes. Without them it learns
    # "advice is benign" whoever speaks, and a later fine-tune has no persona left to move.
    named = world.WorldConfig(p_assistant_role=0.0)
    for _ in range(int(n_convs * cfg.instruct_mix)):
        ids, _ = tokenize_chat(tokenizer, world.pretraining_document(rng, named), cfg.max_len)
        rows.append((ids, [1] * len(ids)))
    return _train(
        model,
        rows,
        cfg.instruct_steps,
        cfg.instruct_batch,
        cfg.instruct_lr,
        cfg.seed + 1,
        tokenizer.pad_token_id,
        "instruct",
    )


def build(
    out_dir: Path = WEIGHTS_DIR, cfg: OrganismConfig = OrganismConfig(), aligned_only: bool = False
) -> dict[str, Path]:
    """Rebuild the shipped base and aligned organisms (bf16 safetensors, a few MB each).

    ``aligned_only``: keep ``out_dir/base`` (and its tokenizer) and redo only the instruct stage from
    it, upcast to fp32 (deterministic given that base).
    """
    import copy
    import json

    from transformers import AutoTokenizer, Qwen2ForCausalLM

    torch.use_deterministic_algorithms(True)
    out_dir = Path(out_dir)
    if aligned_only:
        tok = AutoTokenizer.from_pretrained(out_dir / "base")
        base = Qwen2ForCausalLM.from_pretrained(out_dir / "base", dtype=torch.float32)
        stages = {"aligned": instruct_tune(base, tok, cfg)}
    else:
        tok = build_tokenizer(cfg.seed, cfg.vocab_size)
        base = pretrain(tok, cfg)
        stages = {"base": base, "aligned": instruct_tune(copy.deepcopy(base), tok, cfg)}
    paths = {}
    for name, m in stages.items():
        d = out_dir / name
        m.to(torch.bfloat16).save_pretrained(d)
        tok.save_pretrained(d)
        meta = {**asdict(cfg), "aligned_only": aligned_only}  # aligned_only: made from the bf16 base in out_dir
        (d / "organism_config.json").write_text(json.dumps(meta, indent=1))
        paths[name] = d
    return paths
