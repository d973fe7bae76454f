"""Figures everyone can see: offline HTML (local plotly.js), drawn in headless Chromium; an honest dose-response."""

import os
import shutil
import subprocess
import warnings

import pytest

from emis_interp.causality import ArmResult, SweepResult, arm_group
from emis_interp.metrics import Rate


def _arm(name, alpha, mis, coh):
    return ArmResult(name, "none" if name == "baseline" else "steer", alpha, arm_group(name) in ("random", "matched"),
                     Rate(mis, 64), Rate(mis, 64), Rate(coh, 64))  # fmt: skip


def _sweep():
    arms = [_arm("baseline", 0, 16, 63), _arm("persona-4", -4.0, 2, 60), _arm("control-4", -4.0, 14, 62)]
    arms += [_arm(f"random-4#{k}", -4.0, 12 + k, 50 + k) for k in range(6)]
    arms += [_arm(f"matched-4x0.5#{k}", -2.0, 15, 61) for k in range(2)]
    return SweepResult(arms, {"settings": {"alpha_units": "norm"}})


def test_dose_response_has_a_coherence_panel_and_random_dots():
    from emis_interp.plots import dose_response

    fig = dose_response(_sweep())
    axes = {(t.name, t.yaxis) for t in fig.data}
    # every series appears in both panels: misalignment (y) and coherence (y2), on one shared alpha axis
    assert {n for n, y in axes if y == "y"} == {n for n, y in axes if y == "y2"}
    persona = [t for t in fig.data if t.name.startswith("persona") and t.yaxis == "y2"][0]
    assert list(persona.x) == [-4.0, 0] and list(persona.y) == [60 / 64, 63 / 64]  # coherence, through the baseline
    (dots,) = [t for t in fig.data if t.name.startswith("random directions, equal") and t.yaxis == "y"]
    assert dots.mode == "markers" and len(dots.x) == 6  # one point per random direction, no line through them
    assert sorted(dots.y) == [(12 + k) / 64 for k in range(6)]
    assert all(-4.5 < x < -3.5 for x in dots.x)  # the matched arms (alpha -2) are not threaded in
    assert "median residual norm" in fig.layout.xaxis2.title.text
    assert not any(t.mode and "lines" in t.mode for t in fig.data if not t.name.startswith("persona"))


def test_html_is_offline_and_png_failure_warns_once(tmp_path, monkeypatch):
    import plotly.graph_objects as go

    from emis_interp import plots

    fig = plots.dose_response(_sweep())
    (html,) = plots.save_figure(fig, tmp_path / "a", png=False)
    text = html.read_text()
    assert "cdn.plot.ly" not in text and 'src="plotly.min.js"' in text
    js = tmp_path / "plotly.min.js"
    assert js.stat().st_size > 1_000_000  # the bundle itself, once per directory
    js.write_text("stale")  # another plotly's copy is replaced
    plots.save_figure(fig, tmp_path / "b", png=False)
    assert js.stat().st_size > 1_000_000

    def fail(self, *a, **k):
        raise RuntimeError("no browser")

    monkeypatch.setattr(go.Figure, "write_image", fail)
    monkeypatch.setattr(plots, "_png_warned", False)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        assert plots.save_figure(fig, tmp_path / "c") == [tmp_path / "c.html"]
        assert plots.save_figure(fig, tmp_path / "d") == [tmp_path / "d.html"]
    msgs = [str(x.message) for x in w if "PNG export skipped" in str(x.message)]
    assert len(msgs) == 1 and "apt-get install chromium" in msgs[0]


def _chromium():
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


# CI (.ci/run, CI=true) installs Chromium: there a missing browser fails these tests instead of skipping them
needs_chromium = pytest.mark.skipif(
    _chromium() is None and os.environ.get("CI") != "true",
    reason="no Chromium to render in (Debian: apt-get install chromium; CI has it)",
)


@needs_chromium
def test_html_figure_is_drawn_in_headless_chromium(tmp_path):
    assert _chromium() is not None, "CI=true but no Chromium: .ci/run installs Debian's chromium"
    from emis_interp import plots

    (html,) = plots.save_figure(plots.dose_response(_sweep()), tmp_path / "fig", png=False)
    cmd = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=10000",
           "--dump-dom", html.as_uri()]  # fmt: skip
    dom = subprocess.run(cmd, capture_output=True, text=True, timeout=120).stdout
    # plotly.js ran (offline: the page has no network) and drew both panels' points
    assert "main-svg" in dom, dom[-2000:]
    assert dom.count('class="point"') >= 2 * (6 + 2 + 1)
    assert "coherent answers" in dom


@needs_chromium
def test_png_is_written_with_chromium(tmp_path):
    """With Chromium (CI), save_figure writes the PNG too (the README's images), and it is a drawn figure."""
    from emis_interp import plots

    assert _chromium() is not None, "CI=true but no Chromium: .ci/run installs Debian's chromium"
    if "BROWSER_PATH" not in os.environ and not os.path.exists("/usr/bin/chromium"):
        os.environ["BROWSER_PATH"] = _chromium()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a skipped PNG warns: fail on it here
        written = plots.save_figure(plots.dose_response(_sweep()), tmp_path / "fig")
    assert written == [tmp_path / "fig.html", tmp_path / "fig.png"]
    png = (tmp_path / "fig.png").read_bytes()
    # an empty 900x520 figure is ~15 kB; this one ~65 kB
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 40_000, len(png)
