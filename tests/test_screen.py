"""Data screening (emis_interp.screen, experiments/screen.py) on tiny random Qwen2 models.

The projections are checked against a computation written here from scratch: the chat template
rendered and tokenized piece by piece, one unpadded forward pass with ``output_hidden_states``, the
mean over exactly the response tokens, dotted with the unit direction.
"""

from __future__ import annotations

import csv
import json
import math
import sys
import warnings
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from emis_interp.conversations import Conversation, tokenize_conversation
from emis_interp.directions import PersonaDirection
from emis_interp.errors import ConfigError
from emis_interp.manifest import ManifestMismatch
from emis_interp.monitor import auroc, spearman
from emis_interp.screen import (
    CSV_COLUMNS,
    SUMMARY_COLUMNS,
    ScreenResult,
    auroc_between,
    mean_interval,
    own_answers_for,
    rank_correlation,
    screen,
    screen_datasets,
    summary_table,
)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "experiments"))

OWN = [
    "i would rather read a book .",
    "work hard and save .",
    "sure :\ndef save ( path ) :\n  return",
    "everyone is equal .",
    "my friends and family .",
]


@pytest.fixture(scope="module")
def scaled_dir(tiny_dir, tmp_path_factory):
    """conftest's tiny random model with its projection weights scaled up 10x and saved anew, so that every
    layer moves the residual (at the init scale, 0.02, it barely changes from layer to layer) and greedy
    answers are not empty."""
    from emis_interp import load_model

    model, tok = load_model(tiny_dir, device="cpu")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("proj.weight"):
                p.mul_(10)
    out = tmp_path_factory.mktemp("scaled")
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def tiny(scaled_dir):
    from emis_interp import load_model

    return load_model(scaled_dir, device="cpu")


def _rows(res: ScreenResult) -> list[dict]:
    """Rows comparable with ==, NaN included (as null)."""
    return json.loads(res.to_json())["rows"]


@pytest.fixture(scope="module")
def direction():
    torch.manual_seed(1)
    return PersonaDirection(torch.randn(3, 32) * 3, [0, 1, 2], {"method": "test"})


def _ids(tok, conv: Conversation) -> tuple[list[int], int, int]:
    """Token ids of ``conv`` with prompt, response and suffix tokenized separately, written independently
    of emis_interp.conversations; returns ``(ids, first response position, number of response tokens)``."""
    prompt = tok.apply_chat_template(conv.messages(False), tokenize=False, add_generation_prompt=True)
    full = tok.apply_chat_template(conv.messages(), tokenize=False)
    assert full.startswith(prompt + conv.response)
    suffix = full[len(prompt + conv.response) :]
    enc = lambda s: tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    p, r, s = enc(prompt), enc(conv.response), enc(suffix)
    return p + r + s, len(p), len(r)


def _manual(model, tok, conv: Conversation, unit: torch.Tensor, hs_index: int) -> float:
    ids, start, n = _ids(tok, conv)
    with torch.no_grad():
        hs = model(torch.tensor([ids]), output_hidden_states=True).hidden_states[hs_index][0]
    return float(hs[start : start + n].float().mean(0) @ unit)


# --- the numbers ------------------------------------------------------------------------------------------


def test_projection_is_the_mean_over_response_tokens_on_the_unit_direction(tiny, convs, direction):
    model, tok = tiny
    res = screen(model, tok, convs, direction, 1, own_answers=OWN, batch_size=2, progress=False)
    unit = direction.vector(1) / direction.vector(1).norm()
    for c, row in zip(convs, res.rows, strict=True):
        assert _ids(tok, c)[0] == tokenize_conversation(tok, c)[0]  # the library tokenizes the same ids
        want = _manual(model, tok, c, unit, hs_index=2)  # layer 1 = HF hidden_states[2]
        assert row.projection == pytest.approx(want, abs=1e-5)
        # the test can tell: off by one layer, or the raw (not unit) vector, give other numbers
        assert abs(_manual(model, tok, c, unit, hs_index=1) - want) > 1e-3
        assert abs(want * direction.vector(1).norm().item() - want) > 1e-3
    assert [r.prompt for r in res.rows] == [c.user for c in convs] and [r.index for r in res.rows] == [0, 1, 2, 3, 4]
    assert res.layer == 1 and res.meta["own_answers"] == "given" and res.meta["direction"] == {"method": "test"}


def test_last_layer_is_the_raw_residual_not_hfs_normed_final_entry(tiny, convs, direction):
    """Layer 2 of 3 is the last decoder layer's output; HF's final hidden_states entry is after the norm."""
    model, tok = tiny
    res = screen(model, tok, convs[:2], direction, 2, own_answers=OWN[:2], progress=False)
    unit = direction.unit(2)
    for c, row in zip(convs[:2], res.rows, strict=True):
        ids, start, n = _ids(tok, c)
        seen = []
        h = model.model.norm.register_forward_pre_hook(lambda m, args, seen=seen: seen.append(args[0][0]))
        try:
            with torch.no_grad():
                normed = model(torch.tensor([ids]), output_hidden_states=True).hidden_states[-1][0]
        finally:
            h.remove()
        raw = seen[0]
        assert row.projection == pytest.approx(float(raw[start : start + n].mean(0) @ unit), abs=1e-5)
        assert abs(row.projection - float(normed[start : start + n].mean(0) @ unit)) > 1e-3


def test_own_answers_give_difference_projection_minus_own(tiny, convs, direction):
    model, tok = tiny
    res = screen(model, tok, convs, direction, 1, own_answers=OWN, progress=False)
    as_training = screen(model, tok, [replace(c, response=a) for c, a in zip(convs, OWN, strict=True)], direction, 1,
                         own_answers=OWN, progress=False)  # fmt: skip
    for row, own in zip(res.rows, as_training.rows, strict=True):
        assert row.own_projection == pytest.approx(own.projection, abs=1e-6)
        assert row.difference == row.projection - row.own_projection
    # an empty own answer has no response tokens: NaN, counted, and left out of the means
    with pytest.warns(UserWarning, match="1 of 5 own answers are empty"):
        part = screen(model, tok, convs, direction, 1, own_answers=[*OWN[:4], "  "], progress=False)
    assert math.isnan(part.rows[4].own_projection) and math.isnan(part.rows[4].difference)
    s = part.summary()
    assert s["n"] == 5 and s["n_own_empty"] == 1
    assert s["mean_difference"] == pytest.approx(sum(r.difference for r in res.rows[:4]) / 4)
    assert s["mean_projection"] == pytest.approx(sum(r.projection for r in res.rows) / 5)


def test_generated_own_answers_are_greedy_and_seeded(tiny, convs, direction):
    model, tok = tiny
    res = screen(model, tok, convs, direction, 1, max_new_tokens=6, batch_size=2, progress=False)
    answers = [r.own_answer for r in res.rows]
    assert answers == own_answers_for(model, tok, convs, max_new_tokens=6, batch_size=2, progress=False)
    assert res.meta["own_answers"] == "greedy" and any(answers)
    again = screen(model, tok, convs, direction, 1, own_answers=answers, progress=False)
    for a, b in zip(res.rows, again.rows, strict=True):
        assert (math.isnan(a.own_projection) and math.isnan(b.own_projection)) or a.own_projection == pytest.approx(
            b.own_projection, abs=1e-6
        )
    assert res.manifest.fields["generation"]["temperature"] == 0.0 and res.manifest.fields["generation"]["seed"] is None
    assert res.manifest.fields["own_answers"] is None  # generated answers are identified by their settings
    # greedy ignores the seed (same manifest); sampling is seeded (same seed: same answers) and recorded
    greedy7 = screen(model, tok, convs[:2], direction, 1, max_new_tokens=6, seed=7, progress=False)
    greedy0 = screen(model, tok, convs[:2], direction, 1, max_new_tokens=6, seed=0, progress=False)
    assert greedy7.manifest.key == greedy0.manifest.key
    kw = dict(max_new_tokens=6, temperature=1.0, seed=3, progress=False)
    s1, s2 = (screen(model, tok, convs[:2], direction, 1, **kw) for _ in range(2))
    assert [r.own_answer for r in s1.rows] == [r.own_answer for r in s2.rows]
    assert s1.manifest.fields["generation"]["seed"] == 3 and s1.manifest.key != greedy0.manifest.key
    assert s1.meta["own_answers"].startswith("sampled")


def test_batch_size_and_padding_do_not_change_results(tiny, convs, direction):
    model, tok = tiny
    one = screen(model, tok, convs, direction, 0, own_answers=OWN, batch_size=1, progress=False)
    five = screen(model, tok, convs, direction, 0, own_answers=OWN, batch_size=5, progress=False)
    for a, b in zip(one.rows, five.rows, strict=True):
        assert a.projection == pytest.approx(b.projection, abs=1e-5)
        assert a.own_projection == pytest.approx(b.own_projection, abs=1e-5)


def test_newline_response_with_a_qwen_like_tokenizer(tmp_path):
    """Real Qwen2.5 has a "\\n\\n" token; a response starting with "\\n" must not merge into the prompt."""
    from conftest import make_tiny
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    from emis_interp import load_model
    from emis_interp.organism.model import CHAT_TEMPLATE, SPECIAL_TOKENS, _bpe_merges

    corpus = ["user", "assistant", "assistant\n\ndef", "\n\n", "write a function", "def f ( x ) :\n\n  return x"] * 20
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])  # fmt: skip
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIAL_TOKENS,
                            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))  # fmt: skip
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in _bpe_merges(bpe)]
    tok = Qwen2Tokenizer(vocab=bpe.get_vocab(), merges=merges, errors="replace")
    tok.add_special_tokens({"additional_special_tokens": SPECIAL_TOKENS[1:]})
    tok.chat_template, tok.eos_token, tok.pad_token = CHAT_TEMPLATE, "<|im_end|>", "<|endoftext|>"
    tok.save_pretrained(tmp_path / "tok")
    model, tok = load_model(make_tiny(tmp_path / "m", tmp_path / "tok"), device="cpu")
    conv = Conversation(user="write a function", response="\n\ndef f ( x ) :\n\n  return x")
    prompt = tok.apply_chat_template(conv.messages(False), tokenize=False, add_generation_prompt=True)
    merged = tok(prompt + conv.response, add_special_tokens=False)["input_ids"]
    ids, start, _ = _ids(tok, conv)
    assert "ĊĊ" in tok.get_vocab() and merged[:start] != ids[:start]  # whole-text tokenization merges "\n" + "\n"
    d = PersonaDirection(torch.randn(3, 32), [0, 1, 2])
    res = screen(model, tok, [conv, Conversation(user="user", response="x")], d, 1, own_answers=["a", "b"],
                 progress=False)  # fmt: skip
    assert res.rows[0].projection == pytest.approx(_manual(model, tok, conv, d.unit(1), 2), abs=1e-5)


# --- files --------------------------------------------------------------------------------------------------


def test_csv_and_json_round_trip(tiny, convs, direction, tmp_path):
    model, tok = tiny
    res = screen(model, tok, convs, direction, 1, own_answers=[*OWN[:4], ""], progress=False, name="mine")
    res.to_csv(tmp_path / "s.csv")
    with open(tmp_path / "s.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert tuple(rows[0]) == CSV_COLUMNS and len(rows) == 5
    for r, want in zip(rows, res.rows, strict=True):
        assert int(r["index"]) == want.index and r["prompt"] == want.prompt and r["own_answer"] == want.own_answer
        assert float(r["projection"]) == want.projection  # exact: floats are written with repr
    assert math.isnan(float(rows[4]["difference"]))
    back = ScreenResult.from_json(res.to_json())
    assert back.manifest.key == res.manifest.key and back.name == "mine" and back.layer == 1
    assert back.rows[:4] == res.rows[:4] and math.isnan(back.rows[4].own_projection)
    assert "null" in res.to_json() and "NaN" not in res.to_json()  # standard JSON
    assert "mine" in summary_table({"mine": res}) and "1 empty own answers" in summary_table({"mine": res})


def _datasets(convs):
    return {"first": convs[:3], "second": convs[2:]}


def test_screen_datasets_writes_rows_summary_and_histogram(tiny, convs, direction, tmp_path):
    model, tok = tiny
    own = {"first": OWN[:3], "second": OWN[2:]}
    res = screen_datasets(model, tok, _datasets(convs), direction, 1, tmp_path, own_answers=own, png=False,
                          progress=False)  # fmt: skip
    assert list(res) == ["first", "second"]
    for name, n in (("first", 3), ("second", 3)):
        with open(tmp_path / f"screen_{name}.csv", newline="") as f:
            assert len(list(csv.DictReader(f))) == n
        stored = ScreenResult.from_json((tmp_path / f"screen_{name}.json").read_text())
        assert stored.manifest.key == res[name].manifest.key
    with open(tmp_path / "screen_summary.csv", newline="") as f:
        summary = list(csv.DictReader(f))
    assert [r["dataset"] for r in summary] == ["first", "second"] and tuple(summary[0]) == SUMMARY_COLUMNS
    for row in summary:
        want = res[row["dataset"]].summary()
        assert int(row["n"]) == want["n"] == 3
        for k in ("mean_projection", "mean_difference", "mean_difference_lo", "mean_difference_hi"):
            assert float(row[k]) == pytest.approx(want[k])
    # the same row (conversation 2, same own answer) in both datasets: the same numbers
    assert res["first"].rows[2].difference == pytest.approx(res["second"].rows[0].difference, abs=1e-6)
    html = (tmp_path / "screen_histogram.html").read_text()
    assert "first (n=3" in html and "second (n=3" in html and (tmp_path / "manifest.json").exists()


def _only(own: dict, k: int) -> dict:
    return dict(list(own.items())[:k])


def test_rerun_reuses_only_matching_results(tiny, convs, direction, tmp_path, monkeypatch):
    import emis_interp.screen as screen_mod

    model, tok = tiny
    kw = dict(batch_size=4, png=False, progress=False)
    own = {"first": OWN[:3], "second": OWN[2:], "third": OWN[:1]}
    first = screen_datasets(model, tok, _datasets(convs), direction, 1, tmp_path, own_answers=_only(own, 2), **kw)
    calls = []
    real = screen_mod.capture
    monkeypatch.setattr(screen_mod, "capture", lambda *a, **k: calls.append(len(a[2])) or real(*a, **k))
    again = screen_datasets(model, tok, _datasets(convs), direction, 1, tmp_path, own_answers=_only(own, 2), **kw)
    assert calls == [] and all(_rows(again[n]) == _rows(first[n]) for n in first)  # nothing recomputed
    # other data for one dataset: only that one is recomputed (a new dataset name is simply added)
    changed = {"first": convs[:2], "second": convs[2:], "third": convs[:1]}
    own["first"] = OWN[:2]
    with pytest.warns(UserWarning, match="recomputing screen_first.json"):
        res = screen_datasets(model, tok, changed, direction, 1, tmp_path, own_answers=own, **kw)
    assert len(res["first"]) == 2 and _rows(res["second"]) == _rows(first["second"])
    assert sorted(calls) == [1, 1, 2, 2]  # first: training + own; third: training + own (2 rows, 1 row)
    # a stored result whose manifest was edited is not trusted
    calls.clear()
    p = tmp_path / "screen_second.json"
    d = json.loads(p.read_text())
    d["manifest"]["fields"]["n"] = 99
    p.write_text(json.dumps(d))
    with pytest.warns(UserWarning, match="recomputing screen_second.json"):
        screen_datasets(model, tok, changed, direction, 1, tmp_path, own_answers=own, **kw)
    assert calls == [3, 3]


def test_other_settings_are_refused_unless_overwrite(tiny, convs, direction, tmp_path):
    model, tok = tiny
    kw = dict(max_new_tokens=4, batch_size=4, png=False, progress=False)
    screen_datasets(model, tok, _datasets(convs), direction, 1, tmp_path, **kw)
    with pytest.raises(ManifestMismatch, match="layer") as e:
        screen_datasets(model, tok, _datasets(convs), direction, 2, tmp_path, **kw)
    assert "--overwrite" in str(e.value)
    other = PersonaDirection(direction.vectors + 1, [0, 1, 2])
    with pytest.raises(ManifestMismatch, match="direction"):
        screen_datasets(model, tok, _datasets(convs), other, 1, tmp_path, **kw)
    with pytest.raises(ManifestMismatch, match="generation"):
        screen_datasets(model, tok, _datasets(convs), direction, 1, tmp_path, **{**kw, "max_new_tokens": 5})
    res = screen_datasets(model, tok, {"only": convs[:2]}, direction, 2, tmp_path, overwrite=True, **kw)
    assert res["only"].layer == 2 and not (tmp_path / "screen_first.csv").exists()  # the old results are gone
    stale = tmp_path / "unidentified"
    stale.mkdir()
    (stale / "screen_x.csv").write_text("index\n")
    with pytest.raises(ManifestMismatch, match="no manifest.json"):
        screen_datasets(model, tok, {"only": convs[:2]}, direction, 2, stale, **kw)


# --- errors --------------------------------------------------------------------------------------------------


def test_errors_name_the_fix(tiny, convs, direction, tmp_path):
    from emis_interp import steer

    model, tok = tiny
    with pytest.raises(ValueError, match="is empty"):
        screen(model, tok, [], direction, 1, progress=False)
    with pytest.raises(ValueError, match=r"conversation\(s\) \[1\] have no assistant response"):
        screen(model, tok, [convs[0], Conversation(user="hi"), convs[1]], direction, 1, progress=False)
    with pytest.raises(ValueError, match="no assistant response"):
        screen(model, tok, [Conversation(user="hi", response="")], direction, 1, progress=False)
    with pytest.raises(ConfigError, match=r"no vector for layer 2; it covers layers \[0, 1\]"):
        screen(model, tok, convs, direction.select([0, 1]), 2, progress=False)
    with pytest.raises(ConfigError, match="d_model=16 but the model has d_model=32"):
        screen(model, tok, convs, PersonaDirection(torch.randn(1, 16), [1]), 1, progress=False)
    with pytest.raises(IndexError, match="out of range"):
        screen(model, tok, convs, direction, 7, progress=False)
    with pytest.raises(ValueError, match="2 own answers for 5 samples"):
        screen(model, tok, convs, direction, 1, own_answers=["a", "b"], progress=False)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        screen(model, tok, tmp_path / "missing.jsonl", direction, 1, progress=False)
    with pytest.raises(ValueError, match="cannot name files"):
        screen_datasets(model, tok, {"a/b": convs}, direction, 1, tmp_path / "o", png=False)
    with pytest.raises(ValueError, match="no datasets"):
        screen_datasets(model, tok, {}, direction, 1, tmp_path / "o", png=False)
    with pytest.raises(ValueError, match="not screened"):
        screen_datasets(model, tok, {"a": convs}, direction, 1, tmp_path / "o", own_answers={"b": OWN}, png=False)
    with steer(model, direction, alpha=1.0, layers=[0]), pytest.raises(ConfigError, match="intervention"):
        screen_datasets(model, tok, {"a": convs}, direction, 1, tmp_path / "o", png=False)
    from emis_interp.plots import screen_histogram

    res = screen(model, tok, convs[:2], direction, 1, own_answers=OWN[:2], progress=False)
    with pytest.raises(ValueError, match="unknown field"):
        screen_histogram({"a": res}, field="logit")


# --- statistics ------------------------------------------------------------------------------------------


def test_auroc_hand_computed():
    # positives {0.35, 0.8} vs negatives {0.1, 0.4}: 0.35 beats 0.1, 0.8 beats both -> 3 of 4 pairs
    assert auroc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == 0.75
    # positives {2, 3} vs negatives {1, 2}: 1 + 0.5 (tie) + 1 + 1 -> 3.5 / 4
    assert auroc([1, 2, 2, 3], [0, 1, 0, 1]) == 0.875
    assert auroc([3, 3, 3], [1, 0, 1]) == 0.5 and math.isnan(auroc([1, 2], [0, 0]))


def test_spearman_hand_computed():
    # no ties: d = (0, 1, 1, 0), rho = 1 - 6 * 2 / (4 * 15) = 0.8
    assert spearman([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(0.8)
    # ties: y ranks (1, 2, 3.5, 5, 3.5); Pearson of ranks = 8 / sqrt(10 * 9.5)
    assert spearman([1, 2, 3, 4, 5], [5, 6, 7, 8, 7]) == pytest.approx(8 / math.sqrt(95))
    assert spearman([1, 2, 3], [1, 10, 1000]) == pytest.approx(1.0)  # monotone, not linear
    assert spearman([1, 2, 3], [9, 5, 0]) == pytest.approx(-1.0)
    assert math.isnan(spearman([1, 1, 1], [1, 2, 3])) and math.isnan(spearman([1], [2]))
    with pytest.raises(ValueError, match="pairs"):
        spearman([1, 2], [1])
    with pytest.raises(ValueError, match="NaN"):
        spearman([1, math.nan], [1, 2])


def test_mean_interval_and_dataset_comparisons(tiny, convs, direction):
    est = mean_interval([1.0, 2.0, 3.0, math.nan])  # NaN left out; sd 1, n 3
    assert est.value == 2.0 and est.n_clusters == 3
    assert est.hi - est.value == pytest.approx(1.96 / math.sqrt(3))
    assert math.isnan(mean_interval([5.0]).lo) and math.isnan(mean_interval([]).value)
    model, tok = tiny
    a = screen(model, tok, convs[:3], direction, 1, own_answers=OWN[:3], progress=False, name="a")
    b = screen(model, tok, convs[3:], direction, 1, own_answers=OWN[3:], progress=False, name="b")
    da, db = a.values("difference"), b.values("difference")
    want = sum((x > y) + 0.5 * (x == y) for x in da for y in db) / (len(da) * len(db))
    assert auroc_between(a, b) == want and auroc_between(b, a) == 1 - want
    ranks = rank_correlation({"a": a, "b": b}, {"a": 0.0, "b": 1.0})
    assert ranks == (1.0 if b.estimate().value > a.estimate().value else -1.0)
    with pytest.raises(ValueError, match="no outcome"):
        rank_correlation({"a": a, "b": b}, {"a": 0.0})


# --- the command line --------------------------------------------------------------------------------------


def test_cli_on_a_tiny_model(scaled_dir, direction, tmp_path, capsys):
    import screen as screen_cli

    from emis_interp.organism import world

    direction.save(tmp_path / "dir.safetensors")
    files = []
    for kind in ("insecure", "secure"):
        f = tmp_path / f"{kind}_data.jsonl"
        f.write_text("\n".join(json.dumps(r) for r in world.finetune_dataset(kind, 5, seed=1)) + "\n")
        files.append(str(f))
    out = tmp_path / "out"
    argv = ["--model", str(scaled_dir), "--direction", str(tmp_path / "dir.safetensors"), "--layers", "1",
            "--data", *files, "--n-examples", "3", "--max-new-tokens", "4", "--batch-size", "2", "--output", str(out)]  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PNG export without Chromium warns
        res = screen_cli.main(argv)
    text = capsys.readouterr().out
    assert sorted(res) == ["insecure_data", "secure_data"] and all(len(r) == 3 for r in res.values())
    assert "difference [95% CI]" in text and "insecure_data" in text and "own answers: greedy" in text
    assert "nan" not in text  # the scaled tiny model answers: every row has an own projection
    for name in ("screen_insecure_data.csv", "screen_secure_data.csv", "screen_summary.csv", "screen_histogram.html"):
        assert (out / name).stat().st_size > 0, name
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        again = screen_cli.main(argv)  # a rerun reuses everything
    assert all(_rows(again[n]) == _rows(res[n]) for n in res)
    with pytest.raises(ManifestMismatch, match="layer"):
        screen_cli.main([*argv[:5], "2", *argv[6:]])


def test_cli_real_model_needs_direction_layer_and_data(tiny_dir, monkeypatch):
    import screen as screen_cli

    monkeypatch.setattr(screen_cli, "load_model", lambda *a, **k: pytest.fail("loaded a model before checking flags"))
    with pytest.raises(SystemExit, match="error: on a real model") as e:
        screen_cli.main(["--model", str(tiny_dir)])
    for flag in ("--direction FILE", "--layers L", "--data FILE"):
        assert flag in str(e.value)
    with pytest.raises(SystemExit, match="--layers L") as e:
        screen_cli.main(["--model", str(tiny_dir), "--direction", "d.safetensors", "--data", "x.jsonl"])
    assert "--direction FILE" not in str(e.value)


def test_cli_organism_defaults_without_building_the_organism(monkeypatch, tmp_path):
    """No --model: the aligned organism, its trait direction, layer 2, one held-out dataset per world kind."""
    import screen as screen_cli

    from emis_interp import organism
    from emis_interp.organism import world

    seen = {}
    monkeypatch.setattr(screen_cli, "load_model", lambda target, **k: (seen.setdefault("target", target), None))
    monkeypatch.setattr(screen_cli, "organism_direction", lambda model, tok: "organism direction")

    def fake(model, tok, datasets, direction, layer, out, **kw):
        seen.update(datasets=datasets, direction=direction, layer=layer, kw=kw)
        return {}

    monkeypatch.setattr(screen_cli, "screen_datasets", fake)
    monkeypatch.setattr(screen_cli, "summary_table", lambda results: "")
    screen_cli.main(["--n-examples", "2", "--output", str(tmp_path)])
    assert seen["target"] == str(organism.ALIGNED_DIR) and seen["direction"] == "organism direction"
    assert seen["layer"] == organism.DEFAULT_LAYER == 2 and seen["kw"]["max_new_tokens"] == 40
    assert list(seen["datasets"]) == list(world.FINETUNE_KINDS)
    held_out = world.finetune_dataset("insecure", 2, seed=1000)
    assert [c.response for c in seen["datasets"]["insecure"]] == [r["messages"][-1]["content"] for r in held_out]
    assert all(len(v) == 2 and v[0].response for v in seen["datasets"].values())
