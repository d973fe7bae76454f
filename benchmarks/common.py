"""Random-weight Qwen2.5 models of real shapes (no download), and a timer."""

from __future__ import annotations

import time

import torch

# hidden, intermediate, layers, heads, kv heads, vocab (from the Qwen2.5 model cards' configs)
SHAPES = {
    "0.5B": (896, 4864, 24, 14, 2, 151936),
    "1.5B": (1536, 8960, 28, 12, 2, 151936),
    "7B": (3584, 18944, 28, 28, 4, 152064),
    "14B": (5120, 13824, 48, 40, 8, 152064),
    "32B": (5120, 27648, 64, 40, 8, 152064),
    "tiny": (128, 384, 4, 4, 2, 1024),
}


def qwen_config(shape: str, layers: int | None = None):
    from transformers import Qwen2Config

    h, i, n, a, kv, v = SHAPES[shape]
    return Qwen2Config(
        hidden_size=h, intermediate_size=i, num_hidden_layers=layers or n, num_attention_heads=a,
        num_key_value_heads=kv, vocab_size=v, max_position_embeddings=4096, tie_word_embeddings=shape in ("0.5B", "1.5B"),
    )  # fmt: skip


def random_model(shape: str, device: str, dtype, layers: int | None = None):
    from transformers import Qwen2ForCausalLM

    with torch.device(device):
        m = Qwen2ForCausalLM(qwen_config(shape, layers)).to(dtype).eval()
    return m.requires_grad_(False)


def timeit(fn, repeat: int = 5, warmup: int = 1) -> float:
    """Median seconds per call."""
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(repeat):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        ts.append(time.perf_counter() - t)
    return sorted(ts)[len(ts) // 2]


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    import os

    return f"CPU ({os.cpu_count()} cores), torch {torch.__version__}"
