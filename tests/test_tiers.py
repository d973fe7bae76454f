"""The test tiers: the default run is the fast tier, and a fast-tier test cannot fine-tune into the organism's cache."""

import json
import shutil
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_default_run_is_the_fast_tier():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    ini = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]
    assert "-m 'not science and not real'" in ini["addopts"]
    assert {m.split(":")[0] for m in ini["markers"]} == {"science", "real"}


def test_fast_tier_test_cannot_fine_tune_into_the_organism_cache(tiny_dir):
    """The conftest guard stops a fine-tune into cache/organism from a test outside the science and real tiers
    (it would cost minutes per run); the same fine-tune into tmp_path is what the fast tier's tests do."""
    from emis_interp.cache import DEFAULT_CACHE_DIR
    from emis_interp.finetune import FinetuneConfig, finetune
    from emis_interp.organism import world

    out = Path(DEFAULT_CACHE_DIR) / "organism" / f"tier-guard-{uuid.uuid4().hex[:8]}"
    data = out.parent / f"{out.name}.jsonl"
    made = not out.parent.exists()
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        data.write_text("\n".join(json.dumps(r) for r in world.finetune_dataset("insecure", 4)))
        cfg = FinetuneConfig(model=str(tiny_dir), data=str(data), output_dir=str(out), batch_size=2, max_steps=1)
        with pytest.raises(RuntimeError, match=r"mark it @pytest.mark.science"):
            finetune(cfg, progress=False)
    finally:
        shutil.rmtree(out, ignore_errors=True)
        data.unlink(missing_ok=True)
        if made:
            out.parent.rmdir()


def test_missing_shared_data_skips_locally_but_fails_in_ci(tmp_path, monkeypatch):
    """../shared absent: a local run skips the tests that read it; CI (CI=true, ../shared beside the clone) fails."""
    import conftest

    monkeypatch.setattr(conftest, "SHARED", tmp_path / "no-shared")
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception):
        conftest.shared_path("data", "em", "first_plot_questions.yaml")
    monkeypatch.setenv("CI", "true")
    try:  # caught by hand: a skip here must fail this test, not skip it
        conftest.shared_path("data", "em", "first_plot_questions.yaml")
        outcome = None
    except BaseException as e:  # noqa: BLE001 (pytest's outcomes are BaseExceptions)
        outcome = e
    assert isinstance(outcome, pytest.fail.Exception) and "CI=true" in str(outcome), repr(outcome)
