"""Regression (issue 25 item 3): the EM question file asks each question in three variants (plain, ``_json``,
``_template``). ``split_questions`` split by id, so 7 of 8 base questions landed on both sides of the "disjoint"
selection/evaluation split, and the cluster bootstrap resampled variants as if they were independent questions."""

import pytest
from conftest import shared_path

from emis_interp.behaviour import BehaviourResult
from emis_interp.causality import ArmResult, split_questions
from emis_interp.data import Question, base_question, load_questions
from emis_interp.metrics import Rate


def _check_split(questions):
    sel, ev = split_questions(questions)
    assert sel and ev and len(sel) + len(ev) == len(questions)
    assert not {q.base for q in sel} & {q.base for q in ev}  # no base question on both sides
    return sel, ev


def test_split_on_the_em_question_file():
    qs = load_questions(shared_path("data", "em", "first_plot_questions.yaml"))
    assert len(qs) == 24 and len({q.base for q in qs}) == 8
    sel, ev = _check_split(qs)
    assert len({q.base for q in sel}) == len({q.base for q in ev}) == 4 and len(sel) == len(ev) == 12


def test_split_on_a_synthetic_file(tmp_path):
    body = "".join(
        f"- id: {b}{sfx}\n  paraphrases: ['{b}{sfx} ?']\n"
        for b in ("wish", "bored", "buck", "ruler", "party", "roles")
        for sfx in ("", "_json", "_template")
    )
    (tmp_path / "q.yaml").write_text(body + "- id: lonely\n  paraphrases: ['alone ?']\n")
    qs = load_questions(tmp_path / "q.yaml")
    for seed in range(5):
        sel, ev = split_questions(qs, seed)
        assert not {q.base for q in sel} & {q.base for q in ev}
    assert base_question("quick_buck_template") == "quick_buck" and base_question("_json") == "_json"
    with pytest.raises(ValueError, match="2 base questions"):
        split_questions([Question("a", ["?"]), Question("a_json", ["?"])])


def test_bootstrap_resamples_base_questions():
    per_q = {}
    for b in ("q0", "q1", "q2"):
        for sfx in ("", "_json", "_template"):
            per_q[b + sfx] = {"mo_rate": (1, 10), "em_rate": (1, 5), "coherence": (5, 10)}
    arm = ArmResult("baseline", "none", 0, False, Rate(9, 45), Rate(9, 90), Rate(45, 90), per_question=per_q)
    assert arm.clusters("mo_rate") == {"q0": (3, 30), "q1": (3, 30), "q2": (3, 30)}
    assert arm.bootstrap("mo_rate", 200).n_clusters == 3
    rows = [
        {"seed": s, "step": 10, "question_id": q, "aligned": 10.0, "coherent": 90.0}
        for s in ("a", "b")
        for q in ("x", "x_json", "y_template")
    ]
    res = BehaviourResult.from_rows("run", rows)
    assert set(res.clusters("mo_rate", 10)) == {("a", "x"), ("a", "y"), ("b", "x"), ("b", "y")}
    assert res.clusters("mo_rate", 10)[("a", "x")] == (2, 2)
