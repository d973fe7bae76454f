"""Controls and uncertainty of a sweep, on synthetic judged counts (no model needed)."""

import math

import pytest
import torch

from emis_interp import PersonaDirection
from emis_interp.causality import ArmResult, SweepResult, ablation_arms, arm_group, steering_arms
from emis_interp.metrics import Rate


def _arm(name, kind, alpha, mis, coh=60, n=64, qs=8):
    per_q = {f"q{i}": {"mo_rate": (mis[i], n), "em_rate": (mis[i], coh), "coherence": (coh, n)} for i in range(qs)}
    k = sum(mis[:qs])
    return ArmResult(
        name, kind, alpha, arm_group(name) in ("random", "matched"),
        Rate(k, coh * qs), Rate(k, n * qs), Rate(coh * qs, n * qs), per_question=per_q,
    )  # fmt: skip


def test_arm_names_and_groups():
    d = PersonaDirection(torch.randn(1, 8), [1])
    ctl = PersonaDirection(torch.randn(1, 8) * 7, [1])
    arms = steering_arms(d, [-4, 0, 2], n_random=3, control=ctl, match=(0.5,), n_match=2)
    names = [a.name for a in arms]
    assert len(names) == len(set(names)) == 1 + 2 * (1 + 3 + 1 + 2)
    assert {arm_group(n) for n in names} == {"baseline", "persona", "random", "control", "matched"}
    c = next(a for a in arms if a.name == "control-4")
    assert c.direction.vector(1).norm() == pytest.approx(float(d.vector(1).norm()), rel=1e-5)  # rescaled
    assert next(a for a in arms if a.name == "matched-4x0.5#1").alpha == -2.0
    rnd = [a.direction.vectors for a in arms if a.name.startswith("random-4#")]
    assert not torch.equal(rnd[0], rnd[1])  # K different draws, not one
    assert [arm_group(a.name) for a in ablation_arms(d, n_random=2)] == ["baseline", "persona", "random", "random"]
    with pytest.raises(ValueError, match="distribution"):
        steering_arms(d, [-4], n_random=0)


def test_controls_percentile_p_value_and_matching():
    base = _arm("baseline", "none", 0, [6] * 8)
    persona = _arm("persona-4", "steer", -4.0, [0] * 8, coh=40)
    randoms = [_arm(f"random-4#{k}", "steer", -4.0, [6 - k % 3] * 8, coh=20) for k in range(16)]
    control = _arm("control-4", "steer", -4.0, [3] * 8, coh=50)
    matched = [_arm(f"matched-4x0.5#{k}", "steer", -2.0, [5] * 8, coh=42) for k in range(4)]
    matched += [_arm(f"matched-4x0.25#{k}", "steer", -1.0, [6] * 8, coh=60) for k in range(4)]
    res = SweepResult([base, persona, *randoms, control, *matched], {})
    (c,) = res.controls("mo_rate", n_boot=300)
    assert c["effect"]["value"] == pytest.approx(-6 / 64) and c["effect"]["ci_hi"] < 0
    assert c["random"]["percentile"] == 0 and c["p_value"] == pytest.approx(1 / 17)
    assert len(c["random_directions"]) == 16
    assert c["control"]["effect"]["value"] == pytest.approx(-3 / 64)
    assert c["control"]["persona_minus_control"]["value"] == pytest.approx(-3 / 64)
    m = c["matched"]
    assert m["multiplier"] == 0.5 and m["coherence"] == pytest.approx(42 / 64) and m["p_value"] == pytest.approx(1 / 5)
    # a persona arm no better than the random directions gets no small p-value
    weak = _arm("persona-4", "steer", -4.0, [5] * 8)
    (w,) = SweepResult([base, weak, *randoms], {}).controls("mo_rate", n_boot=100)
    assert w["p_value"] > 0.3
    assert "permutation p = 0.059" in res.controls_table("mo_rate")
    table = res.table()
    assert "random-4 (16)" in table and "matched-4x0.5 (4)" in table and "random-4#3" not in table
    assert not math.isnan(c["baseline"]["value"])


def test_random_arms_at_the_same_alpha_are_a_matching_candidate_and_the_figure_draws_them():
    from emis_interp.plots import random_distribution

    base = _arm("baseline", "none", 0, [6] * 8)
    persona = _arm("persona-4", "steer", -4.0, [0] * 8, coh=20)
    randoms = [_arm(f"random-4#{k}", "steer", -4.0, [6 - k % 3] * 8, coh=21) for k in range(16)]
    matched = [_arm(f"matched-4x0.5#{k}", "steer", -2.0, [5] * 8, coh=42) for k in range(4)]
    res = SweepResult([base, persona, *randoms, *matched], {})
    (c,) = res.controls("mo_rate", n_boot=200)
    assert c["matched"]["multiplier"] == 1 and c["matched"]["k"] == 16  # the random arms cost as much coherence
    assert c["matched"]["p_value"] == pytest.approx(1 / 17)
    fig = random_distribution(res)
    xs = [list(t.x) for t in fig.data]
    assert sorted(xs[0]) == sorted(r["effect"] for r in c["random_directions"])  # the 16 random effects
    assert xs[1] == [pytest.approx(-6 / 64)] and "p = 0.059" in fig.data[1].y[0]  # the persona arm, labelled
