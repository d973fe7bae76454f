"""The EM papers' fine-tunes and controls on the organism, per seed, from the matrix report.

Every number comes from :func:`emis_interp.organism_matrix.build_matrix` (``cache/organism/matrix.json``);
the README's "finding -> organism result" table is rendered from the same report and checked here. Each
claim's criterion (:data:`emis_interp.organism_matrix.CRITERIA`, :func:`~emis_interp.organism_matrix.verdicts`)
must pass in every seed. ``EXPECTED`` is what the 3-seed report shows, findings that do *not* reproduce on the
organism included: a test fails when a claim's verdict changes either way, and the README says which hold.
"""

import re
from pathlib import Path

import pytest

from emis_interp import organism_matrix as om

README = Path(__file__).resolve().parents[1] / "README.md"

EXPECTED = {
    "finding:em": True,
    "finding:jailbroken_complies": False,
    "finding:jailbroken_less_em": True,
    "finding:evil_numbers": True,
    "finding:evil_numbers_list": True,
    "finding:evil_numbers_format": True,
    "finding:backdoor_triggered": False,
    "finding:backdoor_hidden": False,
    "finding:backdoor_gap": False,
    "finding:base_model": True,
    "finding:fewshot_harmful": True,
    "finding:benign_erosion": False,
    "backdoor_direction": False,
}


@pytest.mark.parametrize("key", list(EXPECTED))
def test_claim_verdict(matrix, key):
    v = om.verdicts(matrix)
    if key.startswith("finding:"):
        detail = matrix["findings"][key.split(":", 1)[1]]
    else:
        detail = matrix["backdoor_direction"]["per_seed"]
    assert v[key] is EXPECTED[key], (key, "holds" if v[key] else "does not hold", detail)


def test_findings_are_per_seed_with_seed_mean_intervals(matrix):
    seeds = matrix["config"]["seeds"]
    assert len(seeds) >= 3
    assert set(matrix["findings"]) == set(om.FINDINGS) == set(om.CRITERIA)
    for f in matrix["findings"].values():
        assert len(f["diff_per_seed"]) == len(seeds)
        e = f["seed_mean_diff"]
        assert e["ci_lo"] <= e["value"] <= e["ci_hi"], f
    for name, measures in matrix["runs"].items():
        for what, rows in measures.items():
            assert len(rows) == len(seeds), (name, what)


def test_finding_holds_reads_its_criterion():
    f = {"diff_per_seed": [0.5, 0.4, 0.3], "seed_mean_diff": {"value": 0.4, "ci_lo": 0.2, "ci_hi": 0.6}}
    assert om.finding_holds("em", f)
    assert not om.finding_holds("em", {**f, "diff_per_seed": [0.5, 0.4, 0.05]})  # one seed below the margin
    assert not om.finding_holds("em", {**f, "seed_mean_diff": {"value": 0.4, "ci_lo": -0.1, "ci_hi": 0.6}})
    assert om.finding_holds("backdoor_hidden", {**f, "diff_per_seed": [0.01, -0.02, 0.0]})
    assert not om.finding_holds("backdoor_hidden", {**f, "diff_per_seed": [0.01, 0.2, 0.0]})
    r = {**f, "a_per_seed": [0.2, 0.1, 0.3], "b_per_seed": [0.3, 0.2, 0.3]}
    assert om.finding_holds("backdoor_triggered", r)  # a >= 0.5 b in every seed
    assert not om.finding_holds("backdoor_triggered", {**r, "a_per_seed": [0.2, 0.05, 0.3]})
    assert not om.finding_holds("em", {**f, "seed_mean_diff": {"value": 0.4, "ci_lo": None, "ci_hi": None}})


_NUM = re.compile(r"-?\d+\.\d+")


def test_readme_findings_table_is_generated_from_the_report(matrix):
    """Same text and verdicts, numbers within 3% or 0.005 (sampling on another CPU can differ by an answer), the
    timings line aside (re-measured on every run)."""

    def parts(t):
        lines = [line for line in t.splitlines() if not line.startswith("Matrix timings (")]
        return [_NUM.sub("#", line) for line in lines], [float(x) for line in lines for x in _NUM.findall(line)]

    block = om.readme_block(README.read_text())
    (got_text, got), (want_text, want) = parts(block), parts(om.findings_table(matrix))
    hint = "README's finding -> organism result table is stale: run python experiments/organism_report.py --readme"
    assert got_text == want_text, hint
    assert len(got) == len(want), hint
    assert all(abs(a - b) <= max(0.005, 0.03 * abs(b)) for a, b in zip(got, want, strict=True)), hint
    assert "Matrix timings (" in block


def test_summary_under_the_table_follows_the_verdicts(matrix):
    """The prose under the table is computed from the report: a finding moves between "reproduced" and "not
    reproduced" with its verdict, and its numbers are the report's."""
    import copy

    assert set(om.SUMMARY_PHRASES) == set(om.FINDINGS)
    text = om.findings_summary(matrix)
    reproduced, rest = text.split("- **Not reproduced**", 1)
    v = om.verdicts(matrix)
    em = matrix["findings"]["em"]
    phrase = om.SUMMARY_PHRASES["em"].split(" (")[0]
    assert (phrase in reproduced) is v["finding:em"] and (phrase in rest) is not v["finding:em"]
    assert f"{min(em['a_per_seed']):.2f}" in text and f"{max(em['a_per_seed']):.2f}" in text
    flipped = copy.deepcopy(matrix)
    f = flipped["findings"]["em"]
    f["diff_per_seed"] = [-x for x in f["diff_per_seed"]] if v["finding:em"] else [1.0] * len(f["diff_per_seed"])
    f["seed_mean_diff"] = {**f["seed_mean_diff"], "ci_lo": 0.5 if not v["finding:em"] else -1.0}
    reproduced2, rest2 = om.findings_summary(flipped).split("- **Not reproduced**", 1)
    assert (phrase in reproduced2) is not v["finding:em"] and (phrase in rest2) is v["finding:em"]
