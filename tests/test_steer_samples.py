"""steer.py prints answers a person reads beside the table, and says plainly that a 0.5B model is no judge."""

import sys
from pathlib import Path

from emis_interp.causality import ArmResult, SweepResult
from emis_interp.metrics import Rate

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))


def _arm(name, kind, alpha, answers):
    rows = [{"question": f"q{i}?", "answer": a, "label": "benign"} for i, a in enumerate(answers)]
    return ArmResult(name, kind, alpha, name.startswith("random"), Rate(0, 4), Rate(0, 4), Rate(4, 4), examples=rows)


def test_samples_text_shows_unsteered_and_steered_answers():
    import steer

    res = SweepResult(
        [
            _arm("baseline", "none", 0, ["plain answer", "second", "third", "fourth"]),
            _arm("persona-4", "steer", -4.0, ["steered   answer\nwith a newline", "b", "c", "d"]),
            _arm("random-4#0", "steer", -4.0, ["random answer"]),
        ],
        {},
    )
    text = steer.samples_text(res, 2, on_organism=False)
    assert "-- baseline (alpha 0):" in text and "-- persona-4 (alpha -4):" in text
    assert "A [benign]: plain answer" in text and "A [benign]: steered answer with a newline" in text
    assert "third" not in text and "random answer" not in text  # n answers per arm, persona and baseline only
    assert "a 0.5B model is no judge" in text
    assert "no judge" not in steer.samples_text(res, 2, on_organism=True)  # the organism's judge is exact
    assert steer.samples_text(res, 0, on_organism=False) == ""
