"""Many LoRA adapters in one batch: every batch row runs through its own adapter (gathered LoRA).

A LoRA adapter changes a linear module ``y = x W^T (+ b)`` of the base model into

    y = x W^T (+ b) + s * (x A^T) B^T

with ``A = lora_A.weight [r, d_in]``, ``B = lora_B.weight [d_out, r]`` and PEFT's scaling
``s = lora_alpha / r`` (``lora_alpha / sqrt(r)`` with rsLoRA). :class:`LoraBank` stacks the
adapters of several checkpoints per target module, transposed and with ``s`` folded into ``B``:

    A_bank[k] = A_k^T          [n_adapters, d_in,  r_max]
    B_bank[k] = s_k * B_k^T    [n_adapters, r_max, d_out]

Adapters of lower rank are zero-padded up to ``r_max`` (zero columns of ``A`` meet zero rows of
``B``, so the product is unchanged) and a module an adapter does not target is zero for it. Row 0
is always ``"__base__"``: all zeros, the model before fine-tuning.

Given the bank row ``idx[b]`` of every batch row ``b``, a forward hook on each target module adds

    y[b] <- y[b] + (x[b] @ A_bank[idx[b]]) @ B_bank[idx[b]]

(the punica / S-LoRA idea, in plain torch). Gathering ``A_bank[idx]`` per row would copy
``batch x d_in x r`` weights per module and step, more bytes than the base matmul reads during
decoding; instead the rows are grouped by adapter once per batch (:class:`RowPlan`): the rows of
each used adapter are stacked into ``G`` groups of ``m`` rows (padded to the largest group), so one
pair of batched matmuls per module reads each used adapter's weights once:

    delta[g] = (x[rows of g] @ A_bank[a_g]) @ B_bank[a_g]      [G, m * pos, d_out]

When the batch is already laid out as equal consecutive blocks of adapters ``lo, lo+1, ...`` (a
checkpoints x prompts grid), the groups are views of ``x`` and of the bank, and the second matmul
and the addition are one ``torch.baddbmm``; otherwise the rows are gathered and the deltas added
with ``index_add``. ``"__base__"`` rows are in no group: their outputs are the base module's, bit
for bit (copied, never added to). ``out`` is never modified in place (another hook may hold it).
``benchmarks/bench_mixed.py`` times this against per-row gathering (1.2-1.7x slower end to end
on CPU) and against PEFT's mixed batches (``adapter_names=``, 1.3-2.9x slower), which loop over
adapters in Python inside every LoRA module.

Use it through the intervention engine, so steering and ablation conditions combine with it in the
same batch: ``with bank.attach(model, ["step-10", "__base__", ...]): model.generate(...)``, or
``Condition(..., adapter="step-10")`` rows in :func:`emis_interp.sampling.sample_answers` with
``adapters=bank``. The model must be the plain base model (not a ``PeftModel``). Supported: plain
LoRA on ``torch.nn.Linear`` modules (any rank per adapter and module, rsLoRA, ``rank_pattern`` and
``alpha_pattern`` matched as PEFT matches them); refused
with a :class:`~emis_interp.errors.ConfigError`: DoRA, embedding LoRA, ``modules_to_save``, LoRA
biases, aLoRA, and other PEFT variants whose forward is not ``x A^T B^T``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from jaxtyping import Float, Int
from torch import Tensor

from .adapters import read_adapter
from .errors import ConfigError

BASE = "__base__"

# adapter_config.json fields whose non-default values change PEFT's forward beyond ``x A^T B^T``
_UNSUPPORTED = {
    "use_dora": "DoRA (use_dora) rescales the adapted weight by a per-column magnitude",
    "lora_bias": "lora_bias adds a bias in lora_B",
    "modules_to_save": "modules_to_save replaces whole modules (full copies, not low-rank deltas)",
    "trainable_token_indices": "trainable_token_indices replaces embedding rows",
    "alora_invocation_tokens": "aLoRA activates the adapter only after invocation tokens",
    "layer_replication": "layer_replication changes the layer stack",
    "target_parameters": "target_parameters adapts raw parameters, not linear modules",
    "fan_in_fan_out": "fan_in_fan_out (Conv1D weights) is not a Qwen2 layout",
    "use_qalora": "QALoRA pools the input",
    "use_bdlora": "block-diagonal LoRA",
}


def _is_peft(model) -> bool:
    return hasattr(model, "peft_config") or hasattr(model, "get_base_model")


def _check_plain(model) -> None:
    if _is_peft(model):
        raise ConfigError(
            f"a LoraBank needs the plain base model, got a {type(model).__name__} (PEFT-wrapped). Pass the base "
            "model, e.g. load_model(base) (or model.get_base_model() after model.unload())."
        )


def _check_checkpoint(path: Path) -> dict:
    """Refuse adapters whose forward is not ``x A^T B^T`` (named by their config or their tensors); the config."""
    cfg_path = path / "adapter_config.json"
    if not (path / "adapter_model.safetensors").exists() or not cfg_path.exists():
        raise FileNotFoundError(
            f"{str(path)!r} is not a PEFT LoRA checkpoint (needs adapter_config.json and adapter_model.safetensors)."
        )
    cfg = json.loads(cfg_path.read_text())
    if cfg.get("peft_type", "LORA") != "LORA":
        raise ConfigError(f"{path}: peft_type={cfg.get('peft_type')!r}; a LoraBank holds plain LoRA adapters only.")
    for key, what in _UNSUPPORTED.items():
        if cfg.get(key):
            raise ConfigError(
                f"{path}: {what} ({key}={cfg[key]!r}); a LoraBank supports plain LoRA only. Sample this adapter "
                "with PEFT (load_model(base, adapter=...)) or merge it into full checkpoints."
            )
    from safetensors import safe_open

    with safe_open(str(path / "adapter_model.safetensors"), "pt") as f:
        keys = list(f.keys())
    emb = [k for k in keys if "lora_embedding" in k]
    if emb:
        raise ConfigError(
            f"{path}: embedding LoRA ({emb[0]}); a LoraBank adapts linear modules only. Sample this adapter "
            "with PEFT (load_model(base, adapter=...))."
        )
    for key in keys:
        if ".lora_A." not in key and ".lora_B." not in key:
            raise ConfigError(
                f"{path}: tensor {key} is not a LoRA factor (modules_to_save or another PEFT variant); a LoraBank "
                "holds plain LoRA adapters only."
            )
        if not key.endswith(".weight"):
            raise ConfigError(f"{path}: {key} (a LoRA bias?) is not supported by a LoraBank.")
    return cfg


# --- the bank ----------------------------------------------------------------------------------------


@dataclass(eq=False)
class LoraBank:
    """Stacked LoRA factors of several adapters; bank row 0 is ``"__base__"`` (zero delta).

    ``A[module]`` is ``[n_adapters, d_in, r_max]`` and ``B[module]`` ``[n_adapters, r_max, d_out]``
    (scaling folded into ``B``), on the module's device (fp32 for a bf16/fp16 model, else its dtype); ``module`` is a path in
    the plain base model (``model.layers.3.self_attn.q_proj``). ``states[name]`` is the digest of
    the adapter's checkpoint directory (for manifests), ``paths[name]`` where it was read from.
    """

    names: list[str]
    A: dict[str, Float[Tensor, "n d_in r"]]
    B: dict[str, Float[Tensor, "n r d_out"]]
    states: dict[str, str]
    paths: dict[str, str] = field(default_factory=dict)

    def __post_init__(self):
        if not self.names or self.names[0] != BASE:
            raise ValueError(f"LoraBank.names[0] must be {BASE!r} (the zero delta), got {self.names[:1]}")
        if len(set(self.names)) != len(self.names):
            raise ValueError(f"LoraBank names must be unique, got {self.names}")
        if set(self.A) != set(self.B):
            raise ValueError("LoraBank.A and LoraBank.B must hold the same modules")
        n = len(self.names)
        for mod, a in self.A.items():
            b = self.B[mod]
            if a.ndim != 3 or b.ndim != 3 or a.shape[0] != n or b.shape[0] != n or a.shape[2] != b.shape[1]:
                raise ValueError(
                    f"{mod}: A {tuple(a.shape)} and B {tuple(b.shape)} must be [n_adapters={n}, d_in, r] and "
                    "[n_adapters, r, d_out]"
                )
        missing = [x for x in self.names[1:] if x not in self.states]
        if missing:
            raise ValueError(f"LoraBank.states lacks {missing}")

    @classmethod
    def from_checkpoints(cls, model, adapters: Mapping[str, str | Path], dtype: torch.dtype | None = None) -> LoraBank:
        """Read ``{name: checkpoint_dir}`` (PEFT LoRA adapters of ``model``) into one bank.

        ``model`` is the plain base model the adapters were trained on; the bank's tensors go to
        each target module's device, in ``dtype`` (default: the module's weight dtype, but fp32 for a
        bf16/fp16 model: PEFT also keeps and computes adapters in fp32 there). Names
        keep the mapping's order after ``"__base__"``, e.g.
        ``{f"step-{s}": p for s, p in zip(traj.steps, traj.paths)}`` for a
        :class:`~emis_interp.trajectory.Trajectory`.
        """
        from .manifest import dir_digest  # the same digest as trajectory.checkpoint_state for a local dir

        _check_plain(model)
        if not adapters:
            raise ConfigError(
                "no adapters given; pass {name: checkpoint_dir}, e.g. "
                "{f'step-{s}': p for s, p in zip(traj.steps, traj.paths)}."
            )
        names = [str(k) for k in adapters]
        if BASE in names:
            raise ConfigError(
                f"{BASE!r} is the bank's own zero-delta row (the base model); name your adapters otherwise."
            )
        paths = {str(k): Path(v) for k, v in adapters.items()}
        factors = {}
        for name, path in paths.items():
            if not path.is_dir():
                raise FileNotFoundError(f"adapter {name!r}: {str(path)!r} is not a directory (a checkpoint-N dir).")
            _check_checkpoint(path)
            factors[name] = read_adapter(path)  # PEFT's scaling: adapters.lora_scaling
        modules = dict(model.named_modules())
        wanted = {m for f in factors.values() for m in f}
        unknown = sorted(wanted - set(modules))
        if unknown:
            raise ConfigError(
                f"adapter modules {unknown[:5]} are not in this model; load the base model the adapters were trained "
                "on (base_model_name_or_path in adapter_config.json), as a plain model (load_model(base))."
            )
        A, B = {}, {}
        n = len(names) + 1
        for mod in (m for m in modules if m in wanted):  # model order
            lin = modules[mod]
            if type(lin) is not torch.nn.Linear:
                raise ConfigError(
                    f"{mod} is a {type(lin).__name__}, not a torch.nn.Linear; a LoraBank adapts the linear modules of "
                    "a plain base model (pass load_model(base), not a model with LoRA layers injected)."
                )
            d_in, d_out = lin.in_features, lin.out_features
            r_max = max(f[mod][0].shape[0] for f in factors.values() if mod in f)
            a_stack = torch.zeros(n, d_in, r_max)
            b_stack = torch.zeros(n, r_max, d_out)
            for k, name in enumerate(names, start=1):
                if mod not in factors[name]:
                    continue
                a, b, s = factors[name][mod]
                if a.shape[1] != d_in or b.shape[0] != d_out:
                    raise ConfigError(
                        f"adapter {name!r} ({paths[name]}): {mod} has lora_A {tuple(a.shape)} / lora_B {tuple(b.shape)} "
                        f"but the model's module maps {d_in} -> {d_out}; load the base model it was trained on."
                    )
                r = a.shape[0]
                a_stack[k, :, :r] = a.T
                b_stack[k, :r, :] = s * b.T
            w = lin.weight
            dt = dtype or (torch.float32 if w.dtype in (torch.bfloat16, torch.float16) else w.dtype)
            A[mod] = a_stack.to(w.device, dt)
            B[mod] = b_stack.to(w.device, dt)
        states = {name: dir_digest(p) for name, p in paths.items()}
        return cls([BASE, *names], A, B, states, {k: str(v) for k, v in paths.items()})

    # --- bookkeeping ---------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.names)

    def __repr__(self) -> str:
        ranks = sorted({a.shape[2] for a in self.A.values()})
        return (
            f"LoraBank({len(self.names) - 1} adapters + {BASE!r}, {len(self.A)} modules, r_max={ranks}, "
            f"{self.nbytes() / 2**20:.1f} MiB)"
        )

    def nbytes(self) -> int:
        """Bytes held by the stacked factors."""
        return sum(t.numel() * t.element_size() for d in (self.A, self.B) for t in d.values())

    def state(self) -> dict:
        """Names and checkpoint digests (and dtype), for manifests."""
        dtypes = sorted({str(t.dtype) for t in self.A.values()})
        return {"names": list(self.names), "states": dict(self.states), "dtype": dtypes}

    def index(self, names_per_row: Sequence[str | None]) -> Int[Tensor, " batch"]:
        """Bank rows of ``names_per_row`` (``None`` means ``"__base__"``), as a CPU LongTensor."""
        pos = {n: i for i, n in enumerate(self.names)}
        rows = [BASE if n is None else n for n in names_per_row]
        bad = sorted({n for n in rows if n not in pos}, key=str)
        if bad:
            raise ConfigError(f"unknown adapter(s) {bad}; this bank holds {self.names}.")
        return torch.tensor([pos[n] for n in rows], dtype=torch.long)

    def check_model(self, model) -> None:
        """Raise unless every bank module is a ``torch.nn.Linear`` of ``model`` with the bank's shapes."""
        _check_plain(model)
        modules = dict(model.named_modules())
        for mod, a in self.A.items():
            lin = modules.get(mod)
            if lin is None or type(lin) is not torch.nn.Linear:
                raise ConfigError(
                    f"bank module {mod} is {'missing from' if lin is None else f'a {type(lin).__name__} in'} this "
                    "model; pass the plain base model the bank was built on."
                )
            if (lin.in_features, lin.out_features) != (a.shape[1], self.B[mod].shape[2]):
                raise ConfigError(
                    f"bank module {mod} maps {a.shape[1]} -> {self.B[mod].shape[2]} but the model's maps "
                    f"{lin.in_features} -> {lin.out_features}; pass the base model the bank was built on."
                )

    @contextmanager
    def attach(self, model, names_per_row: Sequence[str | None]) -> Iterator[None]:
        """Run batch row ``b`` through adapter ``names_per_row[b]`` (hooks come off on exit)."""
        from .interventions import Intervention  # upward, allowed: attach is an Intervention holding the bank

        with Intervention(lora=(self, self.index(names_per_row))).attach(model):
            yield


DEFAULT_BANK_GB = 4.0  # per job: at Qwen2.5-32B a rank-32 checkpoint is ~1 GB in fp32, so ~3-4 per job on one 80 GB GPU


def checkpoint_bank_bytes(path: str | Path) -> int:
    """Bytes one checkpoint's adapter takes in a :class:`LoraBank` (fp32, the bank's dtype on a bf16 model),
    read from the safetensors header (no tensor is loaded)."""
    from safetensors import safe_open

    from .adapters import _adapter_file

    n = 0
    with safe_open(str(_adapter_file(Path(path))), framework="pt") as f:
        for key in f.keys():
            if ".lora_" in key:
                shape = f.get_slice(key).get_shape()
                n += math.prod(shape)
    return 4 * n


def group_size_for_budget(paths: Sequence[str | Path], budget_gb: float = DEFAULT_BANK_GB) -> int:
    """Checkpoints per job so that one job's :class:`LoraBank` stays within ``budget_gb`` (at least 1).

    The bank is held on the GPU and, while it is built, once more on CPU; the budget bounds each copy.
    """
    real = [p for p in paths if Path(p).is_dir()]
    if not real:
        return max(1, len(paths))
    per = max(checkpoint_bank_bytes(p) for p in (real[0], real[-1]))
    return max(1, min(len(paths), int(budget_gb * 1e9 // max(per, 1))))


# --- rows to groups, and the delta -------------------------------------------------------------------


@dataclass(eq=False)
class RowPlan:
    """Which rows of a batch go through which adapter, grouped for :func:`apply_rows` (built once per batch).

    ``adapters[g]`` is group ``g``'s bank row (never 0); each group holds ``m`` slots. Either the
    groups are the consecutive blocks ``start + g*m ... start + (g+1)*m`` of the batch (``start``
    set: no copy), or ``order[slot]`` names the row of each of the ``G*m`` slots (a group smaller
    than ``m`` repeats one of its rows), ``slots`` the slots that count (None: all) and ``rows``
    their batch rows.
    """

    n_rows: int
    adapters: list[int]
    m: int = 0
    start: int | None = None
    order: list[int] | None = None
    slots: list[int] | None = None
    rows: list[int] | None = None
    _on: dict = field(default_factory=dict, repr=False)

    @classmethod
    def build(cls, idx: Int[Tensor, " batch"]) -> RowPlan:
        ids = [int(i) for i in idx.tolist()]
        n = len(ids)
        runs: list[list[int]] = []  # [adapter, start, stop]
        for b, a in enumerate(ids):
            if runs and runs[-1][0] == a:
                runs[-1][2] = b + 1
            else:
                runs.append([a, b, b + 1])
        runs = [r for r in runs if r[0] != 0]
        if not runs:
            return cls(n, [])
        sizes = {r[2] - r[1] for r in runs}
        adj = all(runs[i][2] == runs[i + 1][1] for i in range(len(runs) - 1))
        adapters = [r[0] for r in runs]
        if adj and len(sizes) == 1 and adapters == list(range(adapters[0], adapters[0] + len(adapters))):
            return cls(n, adapters, sizes.pop(), start=runs[0][1])
        groups: dict[int, list[int]] = {}
        for b, a in enumerate(ids):
            if a != 0:
                groups.setdefault(a, []).append(b)
        adapters = sorted(groups)
        m = max(len(g) for g in groups.values())
        order, slots, rows = [], [], []
        for g, a in enumerate(adapters):
            r = groups[a]
            slots += range(g * m, g * m + len(r))
            rows += r
            order += r + [r[0]] * (m - len(r))
        return cls(n, adapters, m, order=order, slots=None if len(slots) == len(order) else slots, rows=rows)

    def adapter_rows(self, device: torch.device) -> tuple[RowPlan, Tensor | None]:
        """The plan restricted to its adapter rows and those rows' batch indices (None: every row has an adapter).

        Built once per device; lets a low-precision model upcast only the rows that carry a LoRA delta.
        """
        key = ("adapter_rows", device)
        got = self._on.get(key)
        if got is None:
            if self.start is not None:
                rows = list(range(self.start, self.start + len(self.adapters) * self.m))
                ids = [a for a in self.adapters for _ in range(self.m)]
            else:
                by_row = dict(zip(self.rows, (self.adapters[s // self.m] for s in self._slots()), strict=True))
                rows = sorted(by_row)
                ids = [by_row[r] for r in rows]
            if len(rows) == self.n_rows:
                got = (self, None)
            else:
                got = (RowPlan.build(torch.tensor(ids)), torch.tensor(rows, dtype=torch.long, device=device))
            self._on[key] = got
        return got

    def _slots(self) -> list[int]:
        return self.slots if self.slots is not None else list(range(len(self.order)))

    @property
    def span(self) -> tuple[int, int] | None:
        """``(lo, hi)`` when the groups' adapters are the consecutive bank rows ``lo..hi-1``."""
        a = self.adapters
        return (a[0], a[-1] + 1) if a and a == list(range(a[0], a[-1] + 1)) else None

    def on(self, device: torch.device) -> dict[str, Tensor]:
        """The plan's index tensors on ``device``, moved once."""
        t = self._on.get(device)
        if t is None:
            t = {
                k: torch.tensor(v, dtype=torch.long, device=device)
                for k, v in (
                    ("adapters", self.adapters),
                    ("order", self.order),
                    ("slots", self.slots),
                    ("rows", self.rows),
                )
                if v is not None
            }
            self._on[device] = t
        return t


def apply_rows(
    out: Float[Tensor, "batch *pos d_out"],
    x: Float[Tensor, "batch *pos d_in"],
    A: Float[Tensor, "n d_in r"],
    B: Float[Tensor, "n r d_out"],
    plan: RowPlan,
) -> Float[Tensor, "batch *pos d_out"]:
    """``out`` plus each row's own LoRA delta ``(x[b] @ A[idx[b]]) @ B[idx[b]]``; ``"__base__"`` rows unchanged.

    A new tensor (``out`` is not modified: other hooks may hold it). ``A``/``B`` must be on ``x``'s
    device (a bank in another dtype than ``x``, e.g. fp32 adapters on a bf16 model, computes in the bank's dtype)."""
    if not plan.adapters:
        return out
    if A.dtype != out.dtype:
        # PEFT's way for a low-precision model: x in the adapter's dtype, out + delta there, cast back. Only the
        # adapter rows are upcast (base rows round-trip exactly, so they are copied as they are): bounded memory.
        sub, rows = plan.adapter_rows(x.device)
        if rows is None:
            return apply_rows(out.to(A.dtype), x.to(A.dtype), A, B, plan).to(out.dtype)
        xs, os_ = x.index_select(0, rows), out.index_select(0, rows)
        delta_rows = apply_rows(os_.to(A.dtype), xs.to(A.dtype), A, B, sub).to(out.dtype)
        return out.index_copy(0, rows, delta_rows)
    n, d_in, d_out = x.shape[0], x.shape[-1], out.shape[-1]
    xs = x.reshape(n, -1, d_in)
    p = xs.shape[1]
    G, m = len(plan.adapters), plan.m
    t = plan.on(x.device)
    span = plan.span
    Ag, Bg = (A[span[0] : span[1]], B[span[0] : span[1]]) if span else (A[t["adapters"]], B[t["adapters"]])
    # the rows of each group: a view for consecutive blocks, else gathered (cheaper than gathering weights)
    xg = xs[plan.start : plan.start + G * m] if plan.start is not None else xs.index_select(0, t["order"])
    u = torch.bmm(xg.reshape(G, m * p, d_in), Ag).to(out.dtype)  # [G, m*pos, r]
    o = out.reshape(n, p, d_out)
    if plan.start is not None:  # one fused (out + u @ B) over the block rows; other rows copied as they are
        s, e = plan.start, plan.start + G * m
        seg = torch.baddbmm(o[s:e].reshape(G, m * p, d_out), u, Bg.to(out.dtype)).reshape(e - s, p, d_out)
        res = seg if (s, e) == (0, n) else torch.cat([o[:s], seg, o[e:]])
    else:
        delta = torch.bmm(u, Bg.to(out.dtype)).reshape(G * m, p, d_out)
        res = o.index_add(0, t["rows"], delta if plan.slots is None else delta.index_select(0, t["slots"]))
    return res.reshape(out.shape)
