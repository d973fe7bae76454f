"""Train-time interventions for :func:`emis_interp.finetune.finetune`: CAFT ablation and preventative steering.

:class:`TrainIntervention` edits the residual stream on every *training* forward pass, through the one hook
engine of :mod:`emis_interp.interventions`: CAFT-style ablation (project a direction, or the span of several, out
of the residual after given layers, to zero or to the base model's mean) or preventative steering (add ``coef``
times a direction's raw vector). :func:`intervention_report` is what ``intervention.json`` records: the
intervention with the base model's mean projection on each direction (:func:`base_projection`): zero-ablating a
direction the base projects *negatively* on adds along it, pushing towards the trait (:class:`AblationSignWarning`).
:func:`emis_interp.finetune._code_version` digests this module: a change here never resumes old checkpoints.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from einops import rearrange, reduce
from jaxtyping import Float
from torch import Tensor

from .directions import PersonaDirection
from .errors import ConfigError
from .hooks import release_compile_guard
from .interventions import Intervention, steer
from .manifest import direction_state
from .models import check_layers, d_model, n_layers

INTERVENTION_KINDS = ("ablate", "steer")
ABLATE_TO = ("zero", "mean")  # what kind="ablate" sets the removed component to
INTERVENTION_FILE = "intervention.json"
BASE_PROJECTION_EXAMPLES = 64  # training examples whose response tokens give the base model's mean projection


class AblationSignWarning(UserWarning):
    """Zero-ablating a direction on which the base model projects negatively pushes activations towards it."""


def orthonormal_basis(vectors: Float[Tensor, "k d_model"], what: str = "directions") -> Float[Tensor, "k d_model"]:
    """Orthonormal rows spanning the same space as ``vectors`` (QR, in float64); raises if they are (nearly)
    dependent: the rows are normalised first, so the test is on their angles, not their norms."""
    v = vectors.detach().double()
    if bool((v.norm(dim=-1) == 0).any()):
        raise ConfigError(f"{what} include a zero vector; drop it.")
    v = v / v.norm(dim=-1, keepdim=True)
    q, r = torch.linalg.qr(rearrange(v, "k d -> d k"))
    if bool((r.diagonal().abs() <= 1e-3).any()):
        raise ConfigError(
            f"{what} are linearly dependent (or one is zero), so their span has fewer dimensions than directions; "
            "drop the redundant direction(s)."
        )
    return rearrange(q, "d k -> k d").float()


def _check_coef(kind: str, coef: float) -> None:
    if kind == "steer" and (not math.isfinite(coef) or coef == 0):
        raise ConfigError(
            f"kind='steer' needs a finite non-zero coef (the multiple of the direction's raw vector added at each "
            f"position; persona-vectors' preventative steering uses e.g. coef=5), got {coef!r}."
        )
    if kind == "ablate" and coef != 0:
        raise ConfigError(
            f"coef={coef!r} is only for kind='steer'; kind='ablate' removes the direction's whole component "
            "(CAFT) and takes no coefficient: leave coef at 0."
        )


@dataclass(frozen=True, eq=False)
class TrainIntervention:
    """An edit of the residual stream on every *training* forward pass of :func:`finetune`.

    - ``kind="ablate"`` (CAFT, concept-ablation fine-tuning): after each decoder layer in ``layers``
      the span of ``directions`` is projected out, ``h <- h - Q Q^T h``. Several directions are
      orthonormalised per layer (QR, :func:`orthonormal_basis`) and each basis vector is removed
      in turn, which is exact because projections onto orthonormal vectors commute. ``coef`` stays 0.
      ``ablate_to="zero"`` (default, CAFT) leaves the component at 0; ``ablate_to="mean"`` (mean-ablation)
      sets it to the *base model's* mean, ``h <- h - Q Q^T h + Q Q^T m_l``, where ``m_l`` is the base
      model's mean residual after layer ``l`` (each conversation's mean over its response tokens, whole
      conversations, not cut at ``max_len``; then the mean over conversations) for the first
      :data:`BASE_PROJECTION_EXAMPLES` training conversations (:func:`mean_residual`, computed by
      :func:`finetune` before training and recorded in ``intervention.json``). Zero-ablating a
      direction the base projects negatively on pushes towards the trait (:func:`ablation_sign_warnings`);
      mean-ablation avoids that push. It sets the span's component to one constant at *every* position
      (prompt, padding and special tokens too, while the mean is over response tokens), so it removes the
      base model's own per-token variation along the span as well as the fine-tune's change.
    - ``kind="steer"`` (preventative steering, persona vectors): ``coef * direction.vector(l)`` is
      added at every position after each layer ``l`` in ``layers``. One direction; ``coef`` is in
      units of its raw magnitude, like ``alpha`` in :func:`emis_interp.interventions.steer`.

    The hooks are those of :mod:`emis_interp.interventions` (:meth:`attach`); :func:`finetune` keeps
    them on only while ``trainer.train()`` runs. ``directions`` and ``layers`` are normalised to
    tuples (layers sorted, duplicates dropped).
    """

    kind: str
    directions: PersonaDirection | Sequence[PersonaDirection]
    layers: int | Sequence[int]
    coef: float | int = 0.0
    ablate_to: str = "zero"

    def __post_init__(self):
        dirs = (self.directions,) if isinstance(self.directions, PersonaDirection) else tuple(self.directions)
        layers = (self.layers,) if isinstance(self.layers, int) else tuple(self.layers)
        object.__setattr__(self, "directions", dirs)
        object.__setattr__(self, "layers", tuple(sorted({int(x) for x in layers})))
        object.__setattr__(self, "coef", float(self.coef))
        if self.kind not in INTERVENTION_KINDS:
            raise ConfigError(f"unknown intervention kind {self.kind!r}; choose one of {INTERVENTION_KINDS}.")
        if not dirs or not all(isinstance(d, PersonaDirection) for d in dirs):
            raise ConfigError(
                "directions must be one PersonaDirection or a non-empty list of them (PersonaDirection.load)."
            )
        if self.kind == "steer" and len(dirs) != 1:
            raise ConfigError(
                f"kind='steer' adds one direction, got {len(dirs)}; pass one (e.g. the sum of the vectors as one "
                "PersonaDirection), or use kind='ablate' to remove a span."
            )
        if not self.layers:
            raise ConfigError("no layers given; pass the decoder layers to intervene on, e.g. layers=[20].")
        if len({d.d_model for d in dirs}) > 1:
            raise ConfigError(
                f"the directions differ in d_model ({[d.d_model for d in dirs]}); extract all from one model."
            )
        for i, d in enumerate(dirs):
            missing = [layer for layer in self.layers if layer not in d.layers]
            if missing:
                raise ConfigError(
                    f"direction {i} has no vector for layer(s) {missing}; it covers layers {d.layers}. Pass layers "
                    "among those, or extract the direction at these layers."
                )
            zero = [layer for layer in self.layers if float(d.vector(layer).norm()) == 0]
            if zero:
                raise ConfigError(f"direction {i} is zero at layer(s) {zero}; it has no direction to ablate or add.")
        _check_coef(self.kind, self.coef)
        if self.ablate_to not in ABLATE_TO:
            raise ConfigError(f"unknown ablate_to {self.ablate_to!r}; choose one of {ABLATE_TO}.")
        if self.kind != "ablate" and self.ablate_to != "zero":
            raise ConfigError(
                f"ablate_to={self.ablate_to!r} is for kind='ablate' (what the removed component is set to); "
                "kind='steer' adds a vector and removes nothing: drop ablate_to."
            )
        if self.kind == "ablate":
            for layer in self.layers:
                self.basis(layer)  # raises on linearly dependent directions

    def vectors(self, layer: int) -> Float[Tensor, "k d_model"]:
        """The directions' raw vectors at ``layer``, one row each (fp32)."""
        return torch.stack([d.vector(layer).float() for d in self.directions])

    def basis(self, layer: int) -> Float[Tensor, "k d_model"]:
        """An orthonormal basis of the directions' span at ``layer`` (what ``kind="ablate"`` removes)."""
        return orthonormal_basis(self.vectors(layer), f"the {len(self.directions)} directions at layer {layer}")

    def check(self, model) -> None:
        """Raise :class:`ConfigError` if ``model`` does not fit (d_model, layer range)."""
        dm, n = d_model(model), n_layers(model)
        if self.directions[0].d_model != dm:
            raise ConfigError(
                f"the intervention's direction has d_model={self.directions[0].d_model} but the model has "
                f"d_model={dm}; extract the direction from this model (same size) or fine-tune the matching model."
            )
        bad = [layer for layer in self.layers if not 0 <= layer < n]
        if bad:
            raise ConfigError(
                f"intervention layers {bad} are out of range for a model with {n} decoder layers (0..{n - 1})."
            )

    def ablations(self, reference: Float[Tensor, "layer d_model"] | None = None) -> list[Intervention]:
        """``kind="ablate"``: one engine :class:`Intervention` per orthonormal basis vector ``q`` (all layers each):
        ``project={l: q_l}``, and with ``ablate_to="mean"`` also ``add={l: (q_l . m_l) q_l}``, ``m_l`` the row of
        ``reference`` for layer ``l`` (rows in :attr:`layers` order, which is sorted, as :func:`mean_residual`'s). The engine projects before it adds, and
        the basis vectors are orthogonal, so the span's component ends at ``Q Q^T m_l`` whatever the order."""
        bases = {layer: self.basis(layer) for layer in self.layers}
        if self.ablate_to == "mean":
            if reference is None or tuple(reference.shape) != (len(self.layers), self.directions[0].d_model):
                raise ConfigError(
                    "ablate_to='mean' needs the base model's mean residual at the intervention's layers, one row per "
                    f"layer {list(self.layers)} (finetune computes it: mean_residual), got "
                    f"{None if reference is None else tuple(reference.shape)}."
                )
            ref = dict(zip(self.layers, reference.detach().float(), strict=True))
            return [
                Intervention(
                    project={layer: b[i] for layer, b in bases.items()},
                    add={layer: (b[i] @ ref[layer]) * b[i] for layer, b in bases.items()},
                )
                for i in range(len(self.directions))
            ]
        if reference is not None:
            raise ConfigError("a reference mean is for ablate_to='mean'; zero-ablation (CAFT) takes none.")
        return [Intervention(project={layer: b[i] for layer, b in bases.items()}) for i in range(len(self.directions))]

    @contextmanager
    def attach(self, model, reference: Float[Tensor, "layer d_model"] | None = None) -> Iterator[None]:
        """Install the intervention's hooks on ``model`` (PEFT-wrapped or not); all come off on exit.
        ``reference``: the base model's mean residual at :attr:`layers` (``ablate_to="mean"`` only)."""
        self.check(model)
        with ExitStack() as stack:
            if self.kind == "steer":
                stack.enter_context(steer(model, self.directions[0], self.coef, list(self.layers)))
            else:
                for iv in self.ablations(reference):
                    stack.enter_context(iv.attach(model))
            # the engine keeps generate() from compiling while hooks are on; training never generates, and
            # a full fine-tune's checkpoints save generation_config.json, which must not carry that flag
            release_compile_guard(model)
            yield

    def manifest_fields(self) -> dict:
        """What identifies the intervention in a run's manifest: kind, layers, coef, digests of the vectors used, and
        for mean-ablation ``ablate_to="mean"`` and what determines its reference mean beyond the base model, the
        data and the device type (in the run's manifest): the capture code and :data:`BASE_PROJECTION_EXAMPLES`."""
        from .capture import capture_code

        return {
            "kind": self.kind,
            "layers": list(self.layers),
            "coef": self.coef,
            "directions": [direction_state(d.select(list(self.layers))) for d in self.directions],
            # absent for zero-ablation (manifests as before)
            **(
                {"ablate_to": "mean", "reference": {"capture": capture_code(), "n_examples": BASE_PROJECTION_EXAMPLES}}
                if self.ablate_to == "mean"
                else {}
            ),
        }

    def describe(self) -> dict:
        """A JSON-able description (``intervention.json``): the manifest fields plus each direction's provenance."""
        dirs = [
            {
                "index": i,
                "digest": direction_state(d.select(list(self.layers))),
                "covers_layers": d.layers,
                "norms": {str(layer): d.norms()[layer] for layer in self.layers},
                "meta": d.meta,
            }
            for i, d in enumerate(self.directions)
        ]
        return {**self.manifest_fields(), "directions": dirs}


def mean_residual(
    model, tokenizer, convs, layers, *, n_examples: int = BASE_PROJECTION_EXAMPLES, batch_size: int = 8
) -> Float[Tensor, "layer d_model"]:
    """Mean residual after each of ``layers`` (one row per layer, sorted: ``capture`` sorts and de-duplicates them)
    over the first ``n_examples`` conversations: each conversation's mean over its response tokens (``capture``'s
    ``"mean_response"``), averaged."""
    from .capture import capture

    acts = capture(
        model, tokenizer, list(convs)[:n_examples], layers, "mean_response",
        batch_size=batch_size, cache_dir=None, progress=False,
    )  # fmt: skip
    return reduce(acts.acts, "n layer d -> layer d", "mean")


def mean_projection(
    mean: Float[Tensor, "layer d_model"], layers: Sequence[int], direction: PersonaDirection
) -> dict[int, float]:
    """``{layer: mean[i] . direction.unit(layer)}``: a :func:`mean_residual` (rows in sorted layer order) projected
    onto the direction's unit vector at each layer."""
    if list(layers) != sorted(set(layers)) or len(layers) != len(mean):
        raise ValueError(
            f"layers {list(layers)} must be sorted and distinct, one per row of the mean ({len(mean)} rows), as "
            "mean_residual returns them"
        )
    return {layer: float(mean[i].float() @ direction.unit(layer).float()) for i, layer in enumerate(layers)}


def base_projection(
    model,
    tokenizer,
    convs,
    direction: PersonaDirection,
    layers=None,
    *,
    n_examples: int = BASE_PROJECTION_EXAMPLES,
    batch_size: int = 8,
) -> dict[int, float]:
    """``{layer: mean projection of the residual onto direction.unit(layer)}`` in ``model`` (the base).

    The mean is over the response tokens of each of the first ``n_examples`` conversations, then
    over conversations (:func:`mean_residual`). Its sign says what zero-ablating the direction does
    on average: removing a negative component *adds* ``-projection`` along +direction, i.e. pushes
    towards the trait, like positive steering (:func:`ablation_sign_warnings`).
    """
    layers = check_layers(model, direction.layers if layers is None else layers)
    mean = mean_residual(model, tokenizer, convs, layers, n_examples=n_examples, batch_size=batch_size)
    return mean_projection(mean, layers, direction)


def ablation_sign_warnings(projections: list[dict[int, float]]) -> list[str]:
    """Messages for each (direction, layer) whose base mean projection is negative: zero-ablating it pushes
    activations towards +direction (``projections[i]`` is direction ``i``'s :func:`base_projection`)."""
    return [
        f"ablating direction {i} at layer {layer}: the base model's mean projection on it is {p:+.4g} (negative), "
        f"so zero-ablation adds {-p:.4g} along +direction on average, pushing activations TOWARDS the trait "
        "(like positive steering). Check the direction's sign, or steer with a negative coef instead."
        for i, proj in enumerate(projections)
        for layer, p in proj.items()
        if p < 0
    ]


def intervention_report(
    model, tokenizer, convs, intervention: TrainIntervention, n_examples: int
) -> tuple[dict, Float[Tensor, "layer d_model"]]:
    """:meth:`TrainIntervention.describe` plus the base model's mean projections (and sign warnings, emitted, for
    zero-ablation only: mean-ablation sets the component to that mean), and the mean residual itself (rows in
    ``intervention.layers`` order: mean-ablation's reference)."""
    layers = list(intervention.layers)
    mean = mean_residual(model, tokenizer, convs, layers, n_examples=n_examples)
    projections = [mean_projection(mean, layers, d) for d in intervention.directions]
    zero = intervention.kind == "ablate" and intervention.ablate_to == "zero"
    notes = ablation_sign_warnings(projections) if zero else []
    for msg in notes:
        warnings.warn(msg, AblationSignWarning, stacklevel=3)
    rows = [
        {"direction": i, "layer": layer, "mean_projection": p}
        for i, proj in enumerate(projections)
        for layer, p in proj.items()
    ]
    base = {
        "n_examples": min(n_examples, len(convs)),
        "reduction": "mean over each example's response tokens, then over examples; onto the unit direction",
        "rows": rows,
    }
    if intervention.ablate_to == "mean":  # the value each basis vector's component is set to, per layer
        base["set_to_reading"] = (
            "coordinates of the base mean along the QR basis of the directions' span (a basis vector's sign is "
            "arbitrary; with one direction, |value| = |mean_projection|); span_norm: |Q Q^T m_l|"
        )
        base["span_norm"] = {
            str(layer): float((intervention.basis(layer) @ m).norm()) for layer, m in zip(layers, mean, strict=True)
        }
        base["set_to"] = [
            {"basis_vector": i, "layer": layer, "value": float(q @ m)}
            for layer, m in zip(layers, mean, strict=True)
            for i, q in enumerate(intervention.basis(layer))
        ]
    return {**intervention.describe(), "base_projection": base, "warnings": notes}, mean


def read_intervention(output_dir: str | Path) -> dict | None:
    """The ``intervention.json`` of a fine-tune (None for a run without an intervention)."""
    p = Path(output_dir) / INTERVENTION_FILE
    return json.loads(p.read_text()) if p.exists() else None
