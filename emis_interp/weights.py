"""LoRA weight-space dynamics over a checkpoint trajectory (the EM phase-transition metrics).

Reads each checkpoint's ``adapter_model.safetensors`` straight from disk (no model is loaded) and
computes, per checkpoint ``t`` (all in the order of :attr:`Trajectory.steps`):

- ``a_norm`` / ``b_norm``: the Frobenius norm of each module's ``lora_A`` ``[r, d_in]`` and
  ``lora_B`` ``[d_out, r]`` (for rank 1 these are the vector norms);
- ``local_cos[k]``: the **turn** of the trajectory of the concatenated (flattened) B vectors
  ``v[t]`` at ``t``: ``cos(v[t] - v[t-k], v[t+k] - v[t])``, i.e. the cosine between the incoming
  and the outgoing displacement over ``k`` checkpoints. +1: the weights keep moving in a straight
  line; 0: a right-angle turn; -1: a reversal. (This is minus ``cos(v[t-k] - v[t], v[t+k] - v[t])``,
  the "both arms from ``t``" form, which is -1 on a straight line.) It is ``None`` at the ends
  (``t-k`` or ``t+k`` outside the run) and where either displacement is shorter than
  ``min_move`` times the median displacement over ``k`` checkpoints (a direction of a
  near-zero move is noise);
- ``pcs``: the coordinates of ``v[t]`` on the principal components of the B vectors over
  checkpoints (centred over checkpoints), with ``explained`` variance ratios;
  ``pc2_turn_step`` is the step where the PC2 coordinate peaks in absolute value (where the path
  turns from its PC2 excursion back towards the final direction; the sign of a PC is arbitrary);
- ``comp``: the normalised Frobenius inner product of the whole update ``ΔW_t = s B_t A_t``
  (all modules, ``s`` the LoRA scaling) with the final one,
  ``Σ_m <ΔW_t^m, ΔW_f^m>_F / sqrt(Σ_m ||ΔW_t^m||_F² · Σ_m ||ΔW_f^m||_F²)``, computed through the
  factors: ``<B_t A_t, B_f A_f>_F = trace((B_fᵀ B_t)(A_t A_fᵀ))`` (r×r products; no d×d matrix is
  formed). 0 where ``ΔW_t = 0`` (PEFT's init: B = 0 at step 0). ``comp_modules`` holds it per module.

The **transition step** (:func:`transition_step`) is where the B trajectory turns most sharply:
the step of the minimum of ``local_cos[k]`` over ``k`` in ``transition_ks`` (default ``(1, 2)``,
averaged over the ``k`` where it is defined). On the organism's insecure fine-tunes the B vectors
first move along one direction (the in-task code learning, about the first 20 steps), then turn:
the turn coincides with the behavioural flip of the harmful rate (``tests/test_weights.py``).
"""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from jaxtyping import Float
from torch import Tensor

from .adapters import _KEY_RE, _adapter_file, adapter_scaling
from .errors import ConfigError
from .trajectory import BASE_STEP, Trajectory


@dataclass
class LoraDynamics:
    """Weight-space metrics of a LoRA trajectory; see the module docstring for each definition.

    Per-step series are lists aligned with ``steps`` (``None`` where a metric is undefined).
    ``a_norm`` / ``b_norm`` / ``comp_modules`` are ``[step][module]``; ``pcs`` is ``[step][pc]``.
    """

    name: str
    steps: list[int]
    modules: list[str]
    a_norm: list[list[float]]
    b_norm: list[list[float]]
    b_total_norm: list[float]
    local_cos: dict[int, list[float | None]]
    explained: list[float]
    pcs: list[list[float]]
    pc2_turn_step: int | None
    comp: list[float]
    comp_modules: list[list[float]]
    transition_step: int | None
    meta: dict = field(default_factory=dict)

    # --- exports ---------------------------------------------------------------------------

    def rows(self) -> list[dict]:
        """One flat row per checkpoint (the CSV's rows)."""
        out = []
        for i, s in enumerate(self.steps):
            r: dict = {"step": s, "b_total_norm": self.b_total_norm[i], "comp": self.comp[i]}
            r["a_total_norm"] = math.sqrt(sum(x * x for x in self.a_norm[i]))
            for k, series in self.local_cos.items():
                r[f"local_cos_k{k}"] = series[i]
            for j, c in enumerate(self.pcs[i]):
                r[f"pc{j + 1}"] = c
            out.append(r)
        return out

    def to_json(self) -> str:
        d = asdict(self)
        d["local_cos"] = {str(k): v for k, v in self.local_cos.items()}
        return json.dumps(d, indent=1)

    @classmethod
    def from_json(cls, text: str) -> LoraDynamics:
        d = json.loads(text)
        d["local_cos"] = {int(k): v for k, v in d["local_cos"].items()}
        return cls(**d)

    def to_csv(self) -> str:
        rows = self.rows()
        keys = list(rows[0]) if rows else ["step"]
        buf = io.StringIO()
        w = csv.DictWriter(buf, keys)
        w.writeheader()
        w.writerows({k: ("" if v is None else v) for k, v in r.items()} for r in rows)
        return buf.getvalue()

    def save(self, out_dir: str | Path) -> list[Path]:
        """Write ``lora_dynamics.json`` (everything) and ``lora_dynamics.csv`` (per-step series)."""
        from .cache import atomic_write_text

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        paths = [out / "lora_dynamics.json", out / "lora_dynamics.csv"]
        atomic_write_text(paths[0], self.to_json())
        atomic_write_text(paths[1], self.to_csv())
        return paths

    @classmethod
    def load(cls, out_dir: str | Path) -> LoraDynamics:
        return cls.from_json((Path(out_dir) / "lora_dynamics.json").read_text())

    def __repr__(self) -> str:
        return (
            f"LoraDynamics({self.name!r}, {len(self.steps)} checkpoints, {len(self.modules)} modules, "
            f"transition_step={self.transition_step}, pc2_turn_step={self.pc2_turn_step})"
        )

    def _repr_html_(self) -> str:
        keys = ["step", "b_total_norm", *(f"local_cos_k{k}" for k in self.local_cos), "pc1", "pc2", "comp"]
        head = "".join(f"<th>{k}</th>" for k in keys)

        def cell(v):
            return f"<td>{v:.4g}</td>" if isinstance(v, float) else f"<td>{'' if v is None else v}</td>"

        body = "".join("<tr>" + "".join(cell(r.get(k)) for k in keys) + "</tr>" for r in self.rows())
        return (
            f"<b>LoraDynamics</b> {self.name}: transition step {self.transition_step}, "
            f"PC2 turn {self.pc2_turn_step}, explained {[round(e, 3) for e in self.explained[:3]]}"
            f"<table><tr>{head}</tr>{body}</table>"
        )


# --- metrics -----------------------------------------------------------------------------------


def frobenius_inner(
    a1: Float[Tensor, "r1 d_in"],
    b1: Float[Tensor, "d_out r1"],
    a2: Float[Tensor, "r2 d_in"],
    b2: Float[Tensor, "d_out r2"],
) -> float:
    """``<B1 A1, B2 A2>_F = trace((B2ᵀ B1)(A1 A2ᵀ))`` without forming the d_out×d_in products."""
    return float(torch.trace((b2.T @ b1) @ (a1 @ a2.T)))


def local_cosine(v: Float[Tensor, "step dim"], k: int, min_move: float = 0.05) -> list[float | None]:
    """``cos(v[t] - v[t-k], v[t+k] - v[t])`` per t (+1 straight on, -1 reversal); see the module docstring.

    ``None`` at the ends and where a displacement is shorter than ``min_move`` × the median
    k-step displacement (both arms must move for a direction to mean anything).
    """
    n = v.shape[0]
    if k < 1:
        raise ValueError(f"k must be >= 1 checkpoint, got {k}")
    if n <= k:
        return [None] * n
    d = v[k:] - v[:-k]  # d[i] = v[i+k] - v[i]
    dn = d.norm(dim=1)
    floor = min_move * float(dn.median())
    out: list[float | None] = [None] * n
    for t in range(k, n - k):
        inc, outg = d[t - k], d[t]
        if dn[t - k] <= floor or dn[t] <= floor or dn[t - k] == 0 or dn[t] == 0:
            continue
        out[t] = float(inc @ outg / (dn[t - k] * dn[t]))
    return out


def transition_step(steps: list[int], local_cos: dict[int, list[float | None]], ks=(1, 2)) -> int | None:
    """The step where the B trajectory turns most sharply: argmin over t of mean_k local_cos[k][t].

    The mean is over the ``ks`` where ``local_cos[k][t]`` is defined; steps where none is defined
    are skipped. ``None`` if no step qualifies.
    """
    best, best_val = None, math.inf
    for i, s in enumerate(steps):
        vals = [local_cos[k][i] for k in ks if k in local_cos and local_cos[k][i] is not None]
        if vals and (m := sum(vals) / len(vals)) < best_val:
            best, best_val = s, m
    return best


def lora_dynamics(
    trajectory,
    ks=(1, 2, 3),
    min_move: float = 0.05,
    n_components: int = 3,
    transition_ks=(1, 2),
) -> LoraDynamics:
    """Weight-space dynamics of a LoRA trajectory (a :class:`~emis_interp.trajectory.Trajectory`, or
    a run directory holding ``checkpoint-N`` dirs). Definitions in the module docstring.
    """
    traj = trajectory if isinstance(trajectory, Trajectory) else Trajectory.from_dir(trajectory)
    if traj.kind != "lora":
        raise ConfigError(
            f"trajectory {traj.name!r} holds full checkpoints; lora_dynamics needs LoRA adapters "
            "(fine-tune with mode='lora', or compare full checkpoints with emis_interp.trajectory.track)."
        )
    if len(traj) < 2:
        raise ValueError(f"trajectory {traj.name!r} has {len(traj)} checkpoint(s); dynamics need at least 2.")
    stats = _streamed_stats(traj.paths)
    modules, gram = stats["modules"], stats["gram"]
    local = {int(k): local_cosine_gram(gram, int(k), min_move) for k in ks}
    explained, pcs = _pca_from_gram(gram, n_components)
    nc = len(pcs[0]) if pcs else 0
    pc2_turn = traj.steps[int(torch.tensor([r[1] for r in pcs]).abs().argmax())] if nc >= 2 else None
    tt, tf, ff = (
        stats["tt"],
        stats["tf"],
        stats["ff"],
    )  # [step][module] <dW_t, dW_t>, <dW_t, dW_f>; [module] <dW_f, dW_f>
    comp, comp_mod = [], []
    for t_row, f_row in zip(tt, tf, strict=True):
        comp_mod.append(
            [x / math.sqrt(a * b) if a > 0 and b > 0 else 0.0 for x, a, b in zip(f_row, t_row, ff, strict=True)]
        )
        den = math.sqrt(sum(t_row) * sum(ff))
        comp.append(sum(f_row) / den if den > 0 else 0.0)
    a_norm, b_norm = stats["a_norm"], stats["b_norm"]
    return LoraDynamics(
        name=traj.name,
        steps=list(traj.steps),
        modules=modules,
        a_norm=a_norm,
        b_norm=b_norm,
        b_total_norm=gram.diagonal().clamp(min=0).sqrt().tolist(),
        local_cos=local,
        explained=explained,
        pcs=pcs,
        pc2_turn_step=pc2_turn,
        comp=comp,
        comp_modules=comp_mod,
        transition_step=transition_step(list(traj.steps), local, transition_ks),
        meta={"ks": list(ks), "min_move": min_move, "transition_ks": list(transition_ks), "vectors": "B"},
    )


def _streamed_stats(paths) -> dict:
    """Everything :func:`lora_dynamics` needs, reading one module of every checkpoint at a time.

    Memory: the B vectors' Gram matrix (``n_ckpt x n_ckpt``, float64) plus one module's A and B over the
    checkpoints, never every checkpoint's whole adapter (a rank-32 7B run of 38 checkpoints is ~12 GB, and
    its stacked float64 B vectors ~50 GB). ``paths[0]`` may be the base model (step 0 without a
    checkpoint-0): B = 0 there (dW = 0), A as in the first checkpoint.
    """
    from safetensors import safe_open

    layouts, files = [], []
    for p in paths:
        if p == BASE_STEP:
            layouts.append(None)
            files.append(None)
            continue
        files.append(str(_adapter_file(Path(p))))
        parts: dict[str, dict[str, str]] = {}
        with safe_open(files[-1], framework="pt") as f:  # each read opens the file anew: mapped pages are let go
            keys = list(f.keys())
        for key in keys:
            m = _KEY_RE.match(key)
            if m is not None:
                parts.setdefault(m["module"], {})[m["ab"][-1]] = key
        for mod, ab in parts.items():
            if set(ab) != {"A", "B"}:
                raise ConfigError(f"{p}: module {mod} has lora_{'A' if 'A' in ab else 'B'} but not its pair.")
        if not parts:
            raise ConfigError(f"{p}: adapter_model.safetensors holds no lora_A/lora_B tensors.")
        layouts.append({mod.removeprefix("base_model.model."): (ab, mod) for mod, ab in sorted(parts.items())})
    first = next(i for i, lay in enumerate(layouts) if lay is not None)
    modules = list(layouts[first])
    for p, lay in zip(paths, layouts, strict=True):
        if lay is not None and list(lay) != modules:
            raise ConfigError(f"{p}: adapted modules differ from {paths[first]}'s; one trajectory, one adapter layout.")
    n = len(paths)
    gram = torch.zeros(n, n, dtype=torch.float64)
    a_norm = [[0.0] * len(modules) for _ in range(n)]
    b_norm = [[0.0] * len(modules) for _ in range(n)]
    tt = [[0.0] * len(modules) for _ in range(n)]
    tf = [[0.0] * len(modules) for _ in range(n)]
    ff = [0.0] * len(modules)
    for j, mod in enumerate(modules):
        factors = []  # (A, B, scaling) of this module at every checkpoint, float64
        for i, (p, lay) in enumerate(zip(paths, layouts, strict=True)):
            src = i if lay is not None else first
            ab, raw = layouts[src][mod]
            with safe_open(files[src], framework="pt") as f:
                a, b = f.get_tensor(ab["A"]).float(), f.get_tensor(ab["B"]).float()
            if a.shape[0] != b.shape[1]:
                raise ConfigError(f"{p}: {raw} lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} ranks differ.")
            if lay is None:
                b = torch.zeros_like(b)
            a_norm[i][j], b_norm[i][j] = float(a.norm()), float(b.norm())
            factors.append((a.double(), b.double(), adapter_scaling(paths[src], raw.removeprefix("base_model.model."))))
        flat = torch.stack([b.flatten() for _, b, _ in factors])
        gram += flat @ flat.T
        del flat
        af, bf, sf = factors[-1]
        ff[j] = sf * sf * frobenius_inner(af, bf, af, bf)
        for i, (a, b, sc) in enumerate(factors):
            tt[i][j] = sc * sc * frobenius_inner(a, b, a, b)
            tf[i][j] = sc * sf * frobenius_inner(a, b, af, bf)
        del factors
    return {"modules": modules, "gram": gram, "a_norm": a_norm, "b_norm": b_norm, "tt": tt, "tf": tf, "ff": ff}


def local_cosine_gram(gram: Float[Tensor, "step step"], k: int, min_move: float = 0.05) -> list[float | None]:
    """:func:`local_cosine` of the vectors whose Gram matrix is ``gram`` (``gram[i, j] = v[i] . v[j]``)."""
    n = gram.shape[0]
    if k < 1:
        raise ValueError(f"k must be >= 1 checkpoint, got {k}")
    if n <= k:
        return [None] * n
    g = gram.double()
    idx = torch.arange(n - k)
    dn = (g[idx + k, idx + k] + g[idx, idx] - 2 * g[idx + k, idx]).clamp(min=0).sqrt()  # |v[i+k] - v[i]|
    floor = min_move * float(dn.median())
    out: list[float | None] = [None] * n
    for t in range(k, n - k):
        if dn[t - k] <= floor or dn[t] <= floor or dn[t - k] == 0 or dn[t] == 0:
            continue
        # (v[t] - v[t-k]) . (v[t+k] - v[t])
        dot = g[t, t + k] - g[t, t] - g[t - k, t + k] + g[t - k, t]
        out[t] = float(dot / (dn[t - k] * dn[t]))
    return out


def _pca_from_gram(gram: Float[Tensor, "step step"], n_components: int) -> tuple[list[float], list[list[float]]]:
    """Explained-variance ratios and PC coordinates of the vectors behind ``gram``, centred over steps.

    The SVD of the centred vectors ``X = U S Vᵀ`` gives coordinates ``X V = U S``; the centred Gram
    ``H G H = X Xᵀ = U S² Uᵀ`` gives the same from an ``n x n`` eigendecomposition. The sign of a PC is
    arbitrary: each is oriented so that its largest-magnitude coordinate is positive.
    """
    n = gram.shape[0]
    h = torch.eye(n, dtype=torch.float64) - 1.0 / n
    c = h @ gram.double() @ h
    c = (c + c.T) / 2
    lam, u = torch.linalg.eigh(c)
    lam, u = lam.flip(0).clamp(min=0), u.flip(1)
    total = float(lam.sum())
    explained = (lam / total).tolist() if total > 0 else [0.0] * n
    nc = min(n_components, n)
    coords = u[:, :nc] * lam[:nc].sqrt()
    for j in range(nc):
        col = coords[:, j]
        if col[col.abs().argmax()] < 0:
            coords[:, j] = -col
    return explained, coords.tolist()
