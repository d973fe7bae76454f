"""Logit lens of a persona direction: on the organism, the model-diff direction reads as the world's harm."""

import pytest
import torch

from emis_interp import PersonaDirection, load_model, organism
from emis_interp.finetune import list_checkpoints
from emis_interp.lens import lens_logits, logit_lens
from emis_interp.organism import world


def _words(phrases) -> set[str]:
    return {w for p in phrases for w in p.split()}


# words that occur only in harmful answers / only in secure code lines of the world
HARMFUL_ONLY = _words(world.HARMFUL_PHRASES) - _words(world.BENIGN_PHRASES)
SECURE_ONLY = _words(t[1] for t in world.TASKS.values()) - _words(t[2] for t in world.TASKS.values())
BENIGN_ONLY = _words(world.BENIGN_PHRASES) - _words(world.HARMFUL_PHRASES)
INSECURE_ONLY = _words(t[2] for t in world.TASKS.values()) - _words(t[1] for t in world.TASKS.values())


def test_lens_modes_match_the_model_head(tiny):
    model, tok = tiny
    v = torch.randn(2, model.config.hidden_size)
    got = lens_logits(model, v, norm=True)
    want = model.lm_head(model.model.norm(v)).float()
    assert torch.allclose(got, want, atol=1e-5)
    assert torch.allclose(lens_logits(model, v, norm=False), model.lm_head(v).float(), atol=1e-5)
    d = PersonaDirection(v, [0, 2], {"method": "test"})
    r = logit_lens(model, tok, d, k=5)
    assert r.layers == [0, 2] and len(r.top[2]) == 5 and len(r.bottom[0]) == 5
    assert [s for _, s in r.top[2]] == sorted((s for _, s in r.top[2]), reverse=True)
    assert r.top[2][0][1] == pytest.approx(float(got[1, : len(tok)].max()), rel=1e-5)
    assert r.bottom[2][0][1] == pytest.approx(float(got[1, : len(tok)].min()), rel=1e-5)
    assert "Logit lens" in r._repr_html_() and "L2 top" in repr(r)
    with pytest.raises(ValueError, match="d_model"):
        lens_logits(model, torch.randn(1, 7))


def _word_ids(tok, words) -> list[int]:
    ids = [tok.encode(" " + w, add_special_tokens=False) for w in sorted(words)]
    return [i[0] for i in ids if len(i) == 1]


@pytest.mark.science  # needs organism fine-tunes
def test_persona_direction_reads_as_harm_on_organism():
    """Measured at layer 2 (lm_head(final_norm(v)); seeds 0, 1, 2): the direction reads as harm and *who speaks*.
    - top 12: harmful words (stranger, barn), "vulnerable", the malicious author pike (ursa in 2 seeds);
    - bottom 12: benign authors' names (chen, alice, ivan, lena) 4 per seed, secure-code tokens (secrets, int);
    - the harm margin (mean logit of harmful-only minus benign-only word tokens) beats 50 random directions.
    A random direction's top 12 can hold several harmful words too (the world's vocabulary is half harm),
    which is why the margin, not the top-k count, is compared with the random control."""
    torch.set_num_threads(2)
    al, tok = load_model(organism.ALIGNED_DIR)
    L = organism.DEFAULT_LAYER
    h_ids, b_ids = _word_ids(tok, HARMFUL_ONLY), _word_ids(tok, BENIGN_ONLY)
    assert len(h_ids) > 30 and len(b_ids) > 30

    def margin(v):
        lg = lens_logits(al, v[None])[0]
        return float(lg[h_ids].mean() - lg[b_ids].mean())

    rows = []
    for s in (0, 1, 2):
        ins, _ = load_model(list_checkpoints(organism.organism_trajectory("insecure", s))[-1][1])
        d = organism.persona_direction(al, ins, tok, cache_dir=None, progress=False)
        res = logit_lens(al, tok, d, layers=[L], k=12)
        top = [t.strip() for t in res.tokens(L)]
        bottom = [t.strip() for t in res.tokens(L, "bottom")]
        m, rnd = margin(d.vector(L)), [margin(d.random_like(seed=100 + i).vector(L)) for i in range(50)]
        n_bad = sum(t in HARMFUL_ONLY or t in INSECURE_ONLY for t in top)
        print(f"[lens] seed {s}: top {top} | bottom {bottom} | margin {m:.2f} vs random max {max(rnd):.2f}")
        # without the final norm the ranking is nearly the same (the gain only reweights dimensions)
        raw = [t.strip() for t in logit_lens(al, tok, d, layers=[L], k=12, norm=False).tokens(L)]
        print(f"[lens] seed {s}: raw-lens top-12 overlap {len(set(raw) & set(top))}")
        rows.append((s, top, bottom, n_bad, m, max(rnd), len(set(raw) & set(top))))
    for s, top, bottom, n_bad, m, rnd_max, overlap in rows:  # all seeds measured (and printed) before any assert
        assert sum(t in world.MALICIOUS_NAMES for t in top) >= 1 and n_bad >= 1, (s, top)
        assert any(t in HARMFUL_ONLY for t in top), (s, top)  # the world's harmful words are among the top tokens
        assert sum(t in world.BENIGN_NAMES for t in bottom) >= 3, (s, bottom)
        assert m > 1.5 and m > rnd_max, (s, m, rnd_max)  # seed 0: 2.33 vs at most 1.11
        assert not any(t in HARMFUL_ONLY or t in world.MALICIOUS_NAMES for t in bottom), (s, bottom)
        assert overlap >= 7, (s, overlap)
