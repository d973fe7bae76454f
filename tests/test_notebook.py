"""Execute the walkthrough notebook top to bottom (nbclient) and check its scientific outputs."""

import json
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

pytestmark = pytest.mark.science  # needs organism fine-tunes

NB = Path(__file__).resolve().parents[1] / "notebooks" / "persona_vectors_walkthrough.ipynb"


def test_notebook_runs_and_shows_the_effect():
    nb = nbformat.read(NB, as_version=4)
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), (
        "commit the notebook with outputs stripped"
    )
    NotebookClient(nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(NB.parent)}}).execute()
    last = nb.cells[-1]["outputs"]
    summary = json.loads("".join(o.get("text", "") for o in last if o.get("name") == "stdout"))
    assert summary["insecure_final_shift_norm"] > 2 * summary["secure_final_shift_norm"]  # the direction grows
    # negative alpha (norm units, steer.py's layer) lowers the rate: the paired cluster-bootstrap interval is below 0
    assert summary["insecure_effect_alpha-4_ci_hi"] < 0
    assert abs(summary["transition_step"] - 30) <= 20  # issue #13: the weight-space turn near the flip (step 30)
    print(summary)
    assert [0, "MLP"] in summary["top_components"]  # a component that writes the direction most (every seed)
    # among coherent answers the persona arm is beyond every random direction
    assert summary["random_k_alpha-4"] == 16 and summary["random_p_value_em_alpha-4"] <= 1 / 17 + 1e-9
    figs = [
        o
        for c in nb.cells
        if c.cell_type == "code"
        for o in c["outputs"]
        if "application/vnd.plotly.v1+json" in o.get("data", {})
    ]
    # every figure is an interactive plotly figure: 8 (the four single-metric trajectory figures are one
    # multi-panel figure, trajectory_panels, since plots.trajectory_figure was removed as dead code)
    assert len(figs) >= 8
