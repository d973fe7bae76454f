"""The EM papers' fine-tunes and controls on the organism, per seed, from the matrix report.

Every number comes from :func:`emis_interp.organism.matrix.build_matrix` (``cache/organism/matrix.json``);
the README's "finding -> organism result" table is rendered from the same report and checked here. Each
claim's criterion (:data:`emis_interp.organism.matrix.CRITERIA`, :func:`~emis_interp.organism.matrix.verdicts`)
must pass in every seed. ``EXPECTED`` is what the 3-seed report shows, findings that do *not* reproduce on the
organism included: a test fails when a claim's verdict changes either way, and the README says which hold.
"""

import re
from pathlib import Path

import pytest

from emis_interp.organism import matrix as om

README = Path(__file__).resolve().parents[1] / "docs" / "organism.md"  # the generated blocks (the README links it)

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


@pytest.mark.science  # needs organism fine-tunes
@pytest.mark.parametrize("key", list(EXPECTED))
def test_claim_verdict(matrix, key):
    v = om.verdicts(matrix)
    if key.startswith("finding:"):
        detail = matrix["findings"][key.split(":", 1)[1]]
    else:
        detail = matrix["backdoor_direction"]["per_seed"]
    assert v[key] is EXPECTED[key], (key, "holds" if v[key] else "does not hold", detail)


@pytest.mark.science  # needs organism fine-tunes
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


@pytest.mark.science  # needs organism fine-tunes
def test_readme_findings_table_is_generated_from_the_report(matrix):
    """Same text and verdicts, numbers within 3% or 0.005 (sampling on another CPU can differ by an answer), the
    timings line aside (re-measured on every run)."""

    def parts(t):
        lines = [line for line in t.splitlines() if not line.startswith("Matrix timings (")]
        return [_NUM.sub("#", line) for line in lines], [float(x) for line in lines for x in _NUM.findall(line)]

    block = om.readme_block(README.read_text())
    (got_text, got), (want_text, want) = parts(block), parts(om.findings_table(matrix))
    hint = (
        "docs/organism.md's finding -> organism result table is stale: run python experiments/organism_report.py --docs"
    )
    assert got_text == want_text, hint
    assert len(got) == len(want), hint
    assert all(abs(a - b) <= max(0.005, 0.03 * abs(b)) for a, b in zip(got, want, strict=True)), hint
    assert "Matrix timings (" in block


@pytest.mark.science  # needs organism fine-tunes
def test_summary_under_the_table_follows_the_verdicts(matrix):
    """The prose under the table is computed from the report: every claim of ``verdicts`` is in it once, in the
    bullet its verdict says, a failing finding names where it misses, and a claim moves bullets with its verdict."""
    import copy

    assert set(om.SUMMARY_PHRASES) == set(om.FINDINGS)

    def bullets(report, exploratory=False):
        text = om.findings_summary(report)
        yes = text.split("- **Reproduced in every seed:** ", 1)[1].split("\n- **", 1)[0]
        no = text.split("- **Not reproduced** (rows marked **no**): ", 1)[1].split("\n- **", 1)[0]
        if exploratory:
            return text.split("- **Exploratory** ", 1)[1].split("\n- **", 1)[0]
        return yes, no

    v = om.verdicts(matrix)
    items = om.summary_items(matrix)
    assert sorted(k for k, _, _ in items) == sorted(k for k in v if not k.endswith("_pilot"))
    yes, no = bullets(matrix)
    explore = bullets(matrix, exploratory=True)
    for key, holds, text in items:
        assert holds is v[key]
        if key.startswith("cross_mean:"):  # post hoc: its own bullet, never among the pre-declared claims
            assert text not in yes and text not in no, key
            tag = "holds in every seed" if holds else "not in every seed"
            assert f"{text} ({tag})" in explore, key
        else:
            assert (text in yes) is holds and (text in no) is not holds, key
    for fid, f in matrix["findings"].items():  # a, then b, as the report has them
        text = dict((k, t) for k, _, t in items)[f"finding:{fid}"]
        a = f"{min(f['a_per_seed']):.2f} to {max(f['a_per_seed']):.2f}"
        b = f"{min(f['b_per_seed']):.2f} to {max(f['b_per_seed']):.2f}"
        if fid == "jailbroken_less_em":  # phrased "b against a"
            a, b = b, a
        assert a in text and b in text and text.index(a) <= text.rindex(b), (fid, text)
        if not v[f"finding:{fid}"]:
            assert "misses its criterion: " in text, text
    flipped = copy.deepcopy(matrix)
    f = flipped["findings"]["em"]
    f["diff_per_seed"] = [-x for x in f["diff_per_seed"]] if v["finding:em"] else [1.0] * len(f["diff_per_seed"])
    f["seed_mean_diff"] = {**f["seed_mean_diff"], "ci_lo": 0.5 if not v["finding:em"] else -1.0}
    cell = flipped["convergence"]["per_seed"][0]["cross_ablation"]["insecure"]  # evil_numbers -> insecure, seed 0
    cell["from"]["evil_numbers"]["fraction_removed"] = -1.0
    v2 = om.verdicts(flipped)
    assert v2["finding:em"] is not v["finding:em"] and v2["cross:evil_numbers->insecure"] is False
    yes2, no2 = bullets(flipped)
    em_text = dict((k, t) for k, _, t in om.summary_items(flipped))["finding:em"]
    assert (em_text in yes2) is not v["finding:em"] and (em_text in no2) is v["finding:em"]
    cross = dict((k, t) for k, _, t in om.summary_items(flipped))["cross:evil_numbers->insecure"]
    assert cross in no2 and "-1.00 to" in cross
