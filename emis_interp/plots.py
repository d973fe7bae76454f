"""Plotly figures: steering dose-response, metrics across checkpoint trajectories, data screening.

Every function returns a ``plotly.graph_objects.Figure`` (it renders inline in Jupyter);
:func:`save_figure` writes HTML always and PNG when kaleido finds a Chrome/Chromium
(set ``BROWSER_PATH=/usr/bin/chromium`` for Debian's package).
"""

from __future__ import annotations

import os
import statistics
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

import plotly.graph_objects as go

from .causality import SweepResult
from .screen import FIELDS as SCREEN_FIELDS
from .screen import ScreenResult
from .trajectory import TrackResult

COLORS = ["#d62728", "#1f77b4", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b"]


PLOTLY_JS = "plotly.min.js"  # one local copy of plotly.js beside the HTML figures: they render offline
_png_warned = False


def _write_plotlyjs(directory: Path) -> None:
    """Write the installed plotly.js bundle to ``directory/plotly.min.js`` unless an identical copy is there."""
    from plotly.offline import get_plotlyjs

    js = get_plotlyjs()
    dest = directory / PLOTLY_JS
    if dest.exists() and dest.stat().st_size == len(js.encode()) and dest.read_text(encoding="utf-8") == js:
        return
    tmp = dest.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(js, encoding="utf-8")
    os.replace(tmp, dest)


def save_figure(fig: go.Figure, path: str | Path, png: bool = True) -> list[Path]:
    """Write ``path.html`` (and ``path.png`` if possible); returns the files written.

    The HTML loads plotly.js from ``plotly.min.js`` in the same directory (written once, and rewritten
    when the installed plotly differs), never from a CDN: figures render offline. Keep the two files
    together when copying. PNGs need kaleido and a Chrome/Chromium (Debian: ``apt-get install chromium``;
    ``/usr/bin/chromium`` is found on its own, else set ``BROWSER_PATH``); without one, the HTML is
    still written and one warning per process says why.
    """
    global _png_warned
    path = Path(path).with_suffix("")
    path.parent.mkdir(parents=True, exist_ok=True)
    out = [path.with_suffix(".html")]
    _write_plotlyjs(path.parent)
    fig.write_html(out[0], include_plotlyjs="directory")
    if png:
        if "BROWSER_PATH" not in os.environ and Path("/usr/bin/chromium").exists():
            os.environ["BROWSER_PATH"] = "/usr/bin/chromium"
        try:
            fig.write_image(path.with_suffix(".png"), width=fig.layout.width or 900, height=fig.layout.height or 520)
            out.append(path.with_suffix(".png"))
        except Exception as e:  # kaleido without a browser: HTML only, say so once
            if not _png_warned:
                _png_warned = True
                warnings.warn(
                    f"PNG export skipped ({type(e).__name__}: {str(e)[:120]}); the HTML figures are written. "
                    "For PNGs install Chromium (Debian: apt-get install chromium) or set BROWSER_PATH.",
                    stacklevel=2,
                )
    return out


def _alpha_units_label(result: SweepResult) -> str:
    units = (result.meta.get("settings") or {}).get("alpha_units")
    if units == "norm":
        from .directions import NORM_UNIT

        return f"alpha (units of {NORM_UNIT:g} x the layer's median residual norm)"
    return "alpha (units of the direction's raw norm)"


def dose_response(result: SweepResult, metric: str = "mo_rate", title: str | None = None) -> go.Figure:
    """Misalignment rate (top) and coherence (bottom) against alpha, on one shared alpha axis.

    The persona arm is a line through the baseline (alpha 0), with 95% intervals; the K random
    directions of equal norm are one dot each per alpha (a distribution, never joined by a line), with
    their median as a short grey bar; the control fine-tune's direction (if run) is a square. The
    coherence-matched random arms (at other alphas) are not drawn here: see :func:`random_distribution`.
    """
    from plotly.subplots import make_subplots

    names = {"mo_rate": "misaligned (all answers)", "em_rate": "misaligned among coherent"}
    fig = make_subplots(
        rows=2, cols=1, shared_xaxes=True, vertical_spacing=0.08,
        subplot_titles=(names.get(metric, metric), "coherent answers"),
    )  # fmt: skip
    base = result.baseline()
    persona = sorted([a for a in result.arms if a.group == "persona"], key=lambda a: a.alpha)
    if base is not None:
        persona = sorted([*persona, base], key=lambda a: a.alpha)
    rnd = [a for a in result.arms if a.group == "random"]
    ctl = [a for a in result.arms if a.group == "control"]
    alphas = sorted({a.alpha for a in rnd})
    step = min((b - a for a, b in zip(alphas, alphas[1:], strict=False)), default=1.0)
    for row, m in ((1, metric), (2, "coherence")):
        show = row == 1
        if rnd:
            # the random directions: one dot each, spread a little sideways so that equal values stay visible
            by_alpha: dict[float, list] = {}
            for a in rnd:
                by_alpha.setdefault(a.alpha, []).append(a)
            xs, ys = [], []
            for al, arms in by_alpha.items():
                k = len(arms)
                for j, a in enumerate(sorted(arms, key=lambda a: getattr(a, m).value)):
                    xs.append(al + (j - (k - 1) / 2) * 0.25 * step / max(k, 1))
                    ys.append(getattr(a, m).value)
            fig.add_trace(go.Scatter(
                x=xs, y=ys, mode="markers", name=f"random directions, equal norm (K={len(rnd) // len(by_alpha)} per alpha)",
                marker={"color": "#7f7f7f", "size": 6, "opacity": 0.55}, legendgroup="random", showlegend=show,
            ), row=row, col=1)  # fmt: skip
            med = {al: statistics.median(getattr(a, m).value for a in arms) for al, arms in by_alpha.items()}
            fig.add_trace(go.Scatter(
                x=list(med), y=list(med.values()), mode="markers", name="random directions: median",
                marker={"color": "#404040", "size": 18, "symbol": "line-ew-open", "line": {"width": 3}},
                legendgroup="random-median", showlegend=show,
            ), row=row, col=1)  # fmt: skip
        if ctl:
            fig.add_trace(go.Scatter(
                x=[a.alpha for a in ctl], y=[getattr(a, m).value for a in ctl], mode="markers",
                name="control run's direction, equal norm", legendgroup="control", showlegend=show,
                marker={"color": COLORS[1], "size": 10, "symbol": "square"},
            ), row=row, col=1)  # fmt: skip
        if persona:
            rates = [getattr(a, m) for a in persona]
            fig.add_trace(go.Scatter(
                x=[a.alpha for a in persona], y=[r.value for r in rates], mode="lines+markers",
                name="persona direction (alpha 0: unsteered)", legendgroup="persona", showlegend=show,
                line={"color": COLORS[0]}, marker={"size": 9},
                error_y={"type": "data", "symmetric": False, "array": [r.ci[1] - r.value for r in rates],
                         "arrayminus": [r.value - r.ci[0] for r in rates]},
            ), row=row, col=1)  # fmt: skip
        fig.update_yaxes(range=[-0.03, 1.03], row=row, col=1)
    fig.update_xaxes(title_text=_alpha_units_label(result), row=2, col=1)
    fig.update_layout(
        title=title or "Steering dose-response",
        template="plotly_white",
        height=640,
        width=900,
        legend={"orientation": "h", "y": -0.15},
    )
    return fig


def random_distribution(result: SweepResult, metric: str = "mo_rate", title: str | None = None) -> go.Figure:
    """Each persona arm's effect against the distribution of its K random directions' effects.

    One row per persona arm (alpha or ablation): the random directions' effects (rate minus baseline)
    as dots, the persona arm's as a diamond with its paired cluster-bootstrap interval, and the
    control fine-tune's direction (if run) as a square. The permutation p-value is in the row label.
    """
    fig = go.Figure()
    for i, c in enumerate(result.controls(metric)):
        if "random_directions" not in c:
            continue
        label = f"{c['arm']} (p = {c['p_value']:.3f})"
        effects = [r["effect"] for r in c["random_directions"]]
        fig.add_trace(go.Scatter(
            x=effects, y=[label] * len(effects), mode="markers", name=f"random directions (K={len(effects)})",
            marker={"color": "#7f7f7f", "size": 8, "opacity": 0.6}, showlegend=i == 0, legendgroup="random",
        ))  # fmt: skip
        e = c["effect"]
        fig.add_trace(go.Scatter(
            x=[e["value"]], y=[label], mode="markers", name="persona direction", showlegend=i == 0,
            legendgroup="persona", marker={"color": COLORS[0], "size": 14, "symbol": "diamond"},
            error_x={"type": "data", "symmetric": False, "array": [e["ci_hi"] - e["value"]],
                     "arrayminus": [e["value"] - e["ci_lo"]]},
        ))  # fmt: skip
        if "control" in c:
            fig.add_trace(go.Scatter(
                x=[c["control"]["effect"]["value"]], y=[label], mode="markers", showlegend=i == 0,
                name="control run's direction", legendgroup="control",
                marker={"color": COLORS[1], "size": 11, "symbol": "square"},
            ))  # fmt: skip
    names = {"mo_rate": "misaligned answers (MO definition)", "em_rate": "misaligned among coherent (EM definition)"}
    fig.add_vline(x=0, line_dash="dot", line_color="black")
    fig.update_layout(
        title=title or "Persona direction against random directions of equal norm",
        xaxis_title=f"effect on {names.get(metric, metric)}: arm minus baseline",
        yaxis_title="arm",
        template="plotly_white",
    )
    return fig


def _union_band(series: Sequence[tuple[Sequence[int], Sequence[float]]]):
    """``(steps, mean, lo, hi)`` over seeds on the union of their steps: at each step, the seeds that have it.

    Seeds of one run may hold different checkpoint sets (a Trainer's final checkpoint at ``max_steps``,
    ``save_total_limit`` pruning, runs of other lengths)."""
    at: dict[int, list[float]] = {}
    for steps, values in series:
        for s, v in zip(steps, values, strict=True):
            at.setdefault(s, []).append(v)
    steps = sorted(at)
    return (steps, [statistics.fmean(at[s]) for s in steps], [min(at[s]) for s in steps], [max(at[s]) for s in steps])


def lora_dynamics_figure(
    dyn,
    behaviour: Mapping[str, tuple[Sequence[int], Sequence[float | int]]] | None = None,
    title: str | None = None,
) -> go.Figure:
    """Shared-step panels of a :class:`~emis_interp.weights.LoraDynamics`: B/A norms, local cosine
    (one line per k), PC1/PC2 coordinates, comp score; and, if given, behavioural series
    ``{name: (steps, values)}`` (e.g. the harmful rate per checkpoint) in a last panel.
    The transition step is marked on every panel.
    """
    from plotly.subplots import make_subplots

    panels = ["LoRA norms (Frobenius)", "local cosine of B (turn)", "PCA of B", "comp score vs final ΔW"]
    if behaviour:
        panels.append("behaviour")
    fig = make_subplots(rows=len(panels), cols=1, shared_xaxes=True, subplot_titles=panels, vertical_spacing=0.05)
    x = dyn.steps
    a_tot = [sum(v * v for v in row) ** 0.5 for row in dyn.a_norm]
    fig.add_trace(go.Scatter(x=x, y=dyn.b_total_norm, name="‖B‖ (all modules)", line=dict(color=COLORS[0])), 1, 1)
    fig.add_trace(go.Scatter(x=x, y=a_tot, name="‖A‖ (all modules)", line=dict(color=COLORS[1])), 1, 1)
    for i, (k, series) in enumerate(dyn.local_cos.items()):
        fig.add_trace(go.Scatter(x=x, y=series, name=f"local cos k={k}", mode="lines+markers",
                                 line=dict(color=COLORS[(i + 2) % len(COLORS)])), 2, 1)  # fmt: skip
    for j in range(min(2, len(dyn.pcs[0]) if dyn.pcs else 0)):
        ev = dyn.explained[j]
        fig.add_trace(go.Scatter(x=x, y=[r[j] for r in dyn.pcs], name=f"PC{j + 1} ({ev:.0%} var)",
                                 line=dict(color=COLORS[(j + 4) % len(COLORS)])), 3, 1)  # fmt: skip
    fig.add_trace(go.Scatter(x=x, y=dyn.comp, name="comp score", line=dict(color=COLORS[5])), 4, 1)
    for i, (name, (bx, by)) in enumerate((behaviour or {}).items()):
        fig.add_trace(go.Scatter(x=list(bx), y=list(by), name=name, mode="lines+markers",
                                 line=dict(color=COLORS[i % len(COLORS)], dash="dot")), 5, 1)  # fmt: skip
    if dyn.transition_step is not None:
        for r in range(1, len(panels) + 1):
            fig.add_vline(x=dyn.transition_step, line=dict(color="gray", dash="dash"), row=r, col=1)
    fig.update_xaxes(title_text="training step", row=len(panels), col=1)
    fig.update_layout(
        title=title or f"LoRA weight dynamics: {dyn.name} (transition @ {dyn.transition_step})",
        template="plotly_white",
        height=220 * len(panels),
    )
    return fig


# --- component attribution (emis_interp.attribution) --------------------------------------------------


def attribution_heatmap(attribution, title: str | None = None, baseline=None) -> go.Figure:
    """Layer x component heat-map of an :class:`~emis_interp.attribution.Attribution` (mean over conversations).

    With ``baseline`` (another Attribution, e.g. the aligned model's), the difference is shown.
    """
    m = attribution.mean() - (baseline.mean() if baseline is not None else 0)
    z = m.tolist()
    vmax = float(m.abs().max()) or 1.0
    fig = go.Figure(
        go.Heatmap(
            z=z,
            x=list(attribution.components),
            y=[f"layer {layer}" for layer in attribution.layers],
            colorscale="RdBu",
            reversescale=True,
            zmin=-vmax,
            zmax=vmax,
            text=[[f"{v:.2f}" for v in row] for row in z],
            texttemplate="%{text}",
            colorbar=dict(title="proj."),
        )
    )
    what = "minus baseline" if baseline is not None else ""
    fig.update_layout(
        title=title or f"Direct attribution to the persona direction {what}".strip(),
        xaxis_title="component (attention head / MLP)",
        yaxis_title="writes into",
        yaxis=dict(autorange="reversed"),
        template="plotly_white",
    )
    return fig


def attribution_growth(traj, top: int = 6, relative: bool = True, title: str | None = None) -> go.Figure:
    """Attribution of each component over checkpoints (an :class:`~emis_interp.attribution.AttributionTrajectory`).

    Lines for the ``top`` components with the largest final change (``relative``: minus the first
    checkpoint), the rest in grey.
    """
    s = traj.growth() if relative else traj.stack()  # (step, layer, component)
    flat = s.flatten(1)
    order = _argsort_desc(flat[-1].abs())
    names = [f"L{layer}.{c}" for layer in traj.layers for c in traj.components]
    fig = go.Figure()
    for rank, j in enumerate(order):
        hi = rank < top
        fig.add_trace(
            go.Scatter(
                x=list(traj.steps),
                y=flat[:, j].tolist(),
                mode="lines+markers" if hi else "lines",
                name=names[j],
                line=dict(color=COLORS[rank % len(COLORS)] if hi else "#cccccc", width=2 if hi else 1),
                showlegend=hi,
            )
        )
    fig.update_layout(
        title=title or ("Growth of component attribution" if relative else "Component attribution"),
        xaxis_title="training step",
        yaxis_title="projection on the persona direction" + (" (minus step 0)" if relative else ""),
        template="plotly_white",
    )
    return fig


def _argsort_desc(x) -> list[int]:
    return sorted(range(len(x)), key=lambda i: -float(x[i]))


def _track_band(runs: Sequence[TrackResult], metric: str, layer: int | None):
    series = [r.series(metric, layer) for r in runs]
    series = [s for s in series if s[0]]
    if not series:
        return None
    return _union_band(series)


def trajectory_panels(
    behaviour: Mapping[str, object],
    tracks: Mapping[str, Sequence[TrackResult]],
    layers: Sequence[int],
    controls: Sequence[str] = (),
    departures: Mapping[str, dict] | None = None,
    probe_set: str | None = None,
    title: str | None = None,
) -> go.Figure:
    """The training-dynamics figure: one column of panels over a shared training-step axis.

    Panels: the judged misalignment rate (EM and MO definitions) and coherence (each a run's
    estimate over its seeds with the crossed seeds x questions bootstrap interval as the band), the
    log-prob misalignment metric and the in-task metric (seed mean, min-max band over seeds), and
    per layer the projection of the activation shift on the common persona direction and the shift's
    norm. One colour per run; ``controls`` are drawn dashed; ``departures[run]["step"]`` (from
    :func:`emis_interp.behaviour.departure`) is marked on every panel.
    """
    from plotly.subplots import make_subplots

    from .behaviour import METRICS

    any_track = next(iter(tracks.values()))[0] if tracks else None
    probe_keys = sorted(k for k in (any_track.checkpoints[0] if any_track else {}) if k.startswith("p_mis["))
    if probe_set is not None:
        probe_keys = [f"p_mis[{probe_set}]"]
    panels: list[tuple[str, str, str, int | None]] = []  # (source, metric, title, layer)
    if behaviour:
        panels += [("judged", m, f"{METRICS[m]} (fraction, 95% CI over seeds x questions)", None) for m in METRICS]
    panels += [("track", k, f"log-prob metric: p(misaligned answer) on probes {k[6:-1]!r}", None) for k in probe_keys]
    if any_track and "in_task_logprob" in any_track.checkpoints[0]:
        panels.append(
            ("track", "in_task_logprob", "in-task skill: log-prob of held-out training answers (nats/token)", None)
        )
    for layer in layers:
        if any_track and any(r.get("layer") == layer and "proj_direction" in r for r in any_track.layers):
            panels.append(
                (
                    "track",
                    "proj_direction",
                    f"projection on the common persona direction, layer {layer} (residual units)",
                    layer,
                )
            )
        panels.append(
            ("track", "shift_norm", f"activation shift from step 0, layer {layer}: norm (residual units)", layer)
        )
    fig = make_subplots(rows=len(panels), cols=1, shared_xaxes=True, subplot_titles=[p[2] for p in panels],
                        vertical_spacing=min(0.06, 0.3 / max(1, len(panels))))  # fmt: skip
    names = list(dict.fromkeys([*behaviour, *tracks]))
    notes: list[str] = []
    for i, name in enumerate(names):
        c = COLORS[i % len(COLORS)]
        dash = "dash" if name in controls else "solid"
        shown = False
        for row, (src, metric, _, layer) in enumerate(panels, start=1):
            if src == "judged":
                res = behaviour.get(name)
                if res is None:
                    continue
                tab = res.table()
                steps = [r["step"] for r in tab]
                mean, lo, hi = ([r[metric + sfx] for r in tab] for sfx in ("", "_lo", "_hi"))
                n = len(res.seeds)
            else:
                band = _track_band(tracks.get(name, []), metric, layer) if name in tracks else None
                if band is None:
                    continue
                steps, mean, lo, hi = band
                n = len(tracks[name])
            fig.add_trace(go.Scatter(x=list(steps) + list(steps)[::-1], y=list(hi) + list(lo)[::-1], fill="toself",
                                     fillcolor=c, opacity=0.15, line=dict(width=0), showlegend=False,
                                     hoverinfo="skip", legendgroup=name), row=row, col=1)  # fmt: skip
            fig.add_trace(go.Scatter(x=steps, y=mean, mode="lines+markers", name=f"{name} ({n} seed{'s' if n != 1 else ''})",
                                     line=dict(color=c, dash=dash), legendgroup=name, showlegend=not shown,
                                     marker=dict(size=4)), row=row, col=1)  # fmt: skip
            shown = True
        dep = (departures or {}).get(name)
        if dep and dep.get("step") is not None:
            fig.add_vline(x=dep["step"], line=dict(color=c, dash="dot"))
            notes.append(f"<span style='color:{c}'>{name} departs at step {dep['step']}</span>")
        elif dep:
            notes.append(f"<span style='color:{c}'>{name} does not depart</span>")
    fig.update_xaxes(title_text="training step (0 = before fine-tuning)", row=len(panels), col=1)
    fig.update_layout(
        title=(title or "Fine-tuning dynamics: judged behaviour, log-prob metrics and the persona direction")
        + ("<br><sup>" + "; ".join(notes) + " (EM-definition rate vs the control, fixed-sequence test)</sup>" if notes else ""),
        template="plotly_white", height=230 * len(panels) + 120, width=950,
        legend=dict(orientation="h", y=-0.03, yanchor="top"),
    )  # fmt: skip
    return fig


# --- data screening (emis_interp.screen) --------------------------------------------------------------------


def screen_histogram(
    results: Mapping[str, ScreenResult], field: str = "difference", bins: int = 40, title: str | None = None
) -> go.Figure:
    """Overlaid histograms of one per-sample field of each screened dataset, with each dataset's mean
    as a dotted line (legend: mean and normal 95% interval over samples). ``field`` is
    ``"difference"`` (training response minus the model's own answer), ``"projection"`` or
    ``"own_projection"``; samples whose own answer was empty (NaN) are left out."""
    if field not in SCREEN_FIELDS:
        raise ValueError(f"unknown field {field!r}; choose one of {SCREEN_FIELDS}")
    if not results:
        raise ValueError("no screening results to plot; pass {dataset name: ScreenResult}")
    finite = [v for r in results.values() for v in r.values(field) if v == v]
    lo, hi = (min(finite), max(finite)) if finite else (0.0, 1.0)
    size = (hi - lo) / bins if hi > lo else 1.0
    fig = go.Figure()
    for i, (name, res) in enumerate(results.items()):
        c = COLORS[i % len(COLORS)]
        est = res.estimate(field)
        fig.add_trace(
            go.Histogram(
                x=[v for v in res.values(field) if v == v],
                name=f"{name} (n={est.n_clusters}, mean {est.value:.3g} [{est.lo:.3g}, {est.hi:.3g}])",
                xbins=dict(start=lo, end=hi + size, size=size),
                marker_color=c,
                opacity=0.55,
            )
        )
        if est.n_clusters:
            fig.add_vline(x=est.value, line=dict(color=c, dash="dot"))
    layer = next(iter(results.values())).layer
    names = {
        "difference": "projection difference: training response minus the model's own answer",
        "projection": "projection of the training response",
        "own_projection": "projection of the model's own answer",
    }
    fig.update_layout(
        title=title or f"Data screening on the persona direction (layer {layer})",
        xaxis_title=f"{names[field]} (mean over response tokens, unit direction)",
        yaxis_title="samples",
        barmode="overlay",
        template="plotly_white",
        legend=dict(orientation="h", y=-0.2, yanchor="top"),
    )
    return fig
