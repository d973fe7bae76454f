"""Uncertainty for rates whose answers are not independent draws.

Answers to one question (and all answers of one fine-tuning seed) share a cause, so treating 512
answers as 512 independent draws makes intervals too narrow. Here the unit of resampling is the
*cluster*: a question, or a (seed, question) pair.

- :func:`cluster_bootstrap`: a rate (or any ratio of sums) with a percentile interval, resampling
  clusters with replacement (crossed: seeds and questions each resampled, when ids are ``(seed, question)``);
- :func:`paired_bootstrap_diff`: the difference of two arms measured on the same clusters;
- :func:`cluster_permutation_test`: an exact or Monte-Carlo permutation test of "arm A differs
  from arm B" that swaps whole clusters' labels;
- :func:`rank_p_value`: where an observed effect falls in a distribution of control effects
  (e.g. K random directions), as a percentile and a permutation p-value ``(1 + #{null >= obs}) / (K + 1)``.

With few clusters a percentile bootstrap still under-covers somewhat (in ``tests/test_stats.py``'s
simulation, 8 questions: 84% for a nominal 95%, against 61% for a Wilson interval that assumes
independent answers). Everything is plain-Python arithmetic on small lists, seeded and deterministic.
"""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Estimate:
    """A point estimate with a 95% interval and how it was made (``method``, ``n_clusters``)."""

    value: float | int
    lo: float
    hi: float
    method: str
    n_clusters: int

    def as_dict(self) -> dict:
        return {
            "value": self.value,
            "ci_lo": self.lo,
            "ci_hi": self.hi,
            "method": self.method,
            "n_clusters": self.n_clusters,
        }

    def __str__(self) -> str:
        return f"{self.value:.3f} [{self.lo:.3f},{self.hi:.3f}]"


Cluster = tuple[float | int, float | int]  # (numerator sum, denominator sum) of one cluster


def _ratio(clusters: Sequence[Cluster]) -> float:
    num = sum(c[0] for c in clusters)
    den = sum(c[1] for c in clusters)
    return num / den if den else math.nan


def _quantiles(xs: list[float], level: float = 0.95) -> tuple[float, float]:
    xs = sorted(x for x in xs if not math.isnan(x))
    if not xs:
        return math.nan, math.nan
    a = (1 - level) / 2

    def q(p):
        k = p * (len(xs) - 1)
        f = math.floor(k)
        return xs[f] + (xs[min(f + 1, len(xs) - 1)] - xs[f]) * (k - f)

    return q(a), q(1 - a)


def _resample_ids(ids: list, rng: random.Random) -> list:
    """One bootstrap draw of cluster ids.

    Plain ids: clusters with replacement. ``(seed, question)`` ids: a *crossed* draw (seeds and
    questions are crossed factors, the same questions under every seed): seeds with replacement,
    one set of questions with replacement, and every drawn (seed, question) pair that exists. So a
    question's shared effect varies between replicates instead of averaging out over seeds.
    """
    if not all(isinstance(i, tuple) and len(i) == 2 for i in ids):
        return [ids[rng.randrange(len(ids))] for _ in ids]
    seeds = sorted({i[0] for i in ids}, key=repr)
    questions = sorted({i[1] for i in ids}, key=repr)
    have = set(ids)
    s_draw = [seeds[rng.randrange(len(seeds))] for _ in seeds]
    q_draw = [questions[rng.randrange(len(questions))] for _ in questions]
    return [(s, q) for s in s_draw for q in q_draw if (s, q) in have]


def cluster_bootstrap(clusters: dict, n_boot: int = 2000, seed: int = 0, level: float = 0.95) -> Estimate:
    """Ratio-of-sums estimate with a percentile bootstrap interval over clusters.

    ``clusters`` maps a cluster id to ``(numerator, denominator)`` (e.g. ``(#misaligned, #answers)``
    for one question). Ids that are tuples ``(seed, question)`` are resampled crossed (seeds and
    questions each with replacement), so seed-to-seed and question-to-question variation both widen
    the interval.
    """
    if not clusters:
        raise ValueError("no clusters to bootstrap; pass {cluster_id: (numerator, denominator)}")
    return cluster_bootstrap_statistic(clusters, _ratio, n_boot, seed, level, unit="questions")


def paired_bootstrap_diff(a: dict, b: dict, n_boot: int = 2000, seed: int = 0, level: float = 0.95) -> Estimate:
    """``rate(a) - rate(b)`` for two arms measured on the same clusters, resampling clusters jointly."""
    if set(a) != set(b):
        raise ValueError("paired_bootstrap_diff needs both arms on the same clusters (same questions and seeds)")
    ids = sorted(a, key=repr)
    rng = random.Random(seed)
    boots = []
    for _ in range(n_boot):
        pick = _resample_ids(ids, rng)
        boots.append(_ratio([a[i] for i in pick]) - _ratio([b[i] for i in pick]))
    lo, hi = _quantiles(boots, level)
    return Estimate(_ratio(list(a.values())) - _ratio(list(b.values())), lo, hi, "paired cluster bootstrap", len(ids))


def unpaired_seeds_bootstrap_diff(a: dict, b: dict, n_boot: int = 2000, seed: int = 0, level: float = 0.95) -> Estimate:
    """``rate(a) - rate(b)`` for two groups of *independent runs* asked the same questions.

    Ids are ``(seed, question)``. Seed ``s`` of ``a`` and seed ``s`` of ``b`` are different runs (e.g.
    insecure-s0 and secure-s0), so each group's seeds are resampled on their own; the questions are
    shared, so one draw of questions serves both groups. With 3 seeds a group the interval under-covers
    (``n_clusters`` counts (seed, question) cells, not independent units).
    """
    return seeds_bootstrap(a, b, lambda ca, cb: _ratio(ca) - _ratio(cb), n_boot, seed, level)


def rate_ratio(ca: Sequence[Cluster], cb: Sequence[Cluster], floor: bool = True) -> float:
    """``rate(a) / rate(b)``; a rate of 0 in ``b`` counts as one event in its answers (a finite lower bound), or
    gives NaN with ``floor=False``."""
    den, rb = sum(c[1] for c in cb), _ratio(cb)
    if not den or (not floor and rb == 0):
        return math.nan
    return _ratio(ca) / max(rb, 1 / den)


def seeds_bootstrap(
    a: dict, b: dict, statistic, n_boot: int = 2000, seed: int = 0, level: float = 0.95, paired: bool = False
) -> Estimate:
    """``statistic(clusters of a, clusters of b)`` (e.g. the difference or :func:`rate_ratio` of the pooled
    rates) for two groups of runs asked the same questions (ids ``(seed, question)``), with a percentile
    bootstrap: one draw of questions serves both groups; seeds are drawn once for both groups when ``paired``
    (seed ``s`` of ``a`` and of ``b`` share data and training seed, e.g. a fine-tune with and without a train-time
    intervention), else each group's seeds on their own (:func:`unpaired_seeds_bootstrap_diff`)."""
    if not all(isinstance(i, tuple) and len(i) == 2 for i in list(a) + list(b)):
        raise ValueError("seeds_bootstrap needs (seed, question) ids in both groups")
    questions = sorted({i[1] for i in a} | {i[1] for i in b}, key=repr)
    sa, sb = sorted({i[0] for i in a}, key=repr), sorted({i[0] for i in b}, key=repr)
    if paired and sa != sb:
        raise ValueError(f"paired seeds_bootstrap needs the same seeds in both groups, got {sa} and {sb}")
    rng = random.Random(seed)
    boots = []
    for _ in range(n_boot):
        q_draw = [questions[rng.randrange(len(questions))] for _ in questions]
        da = [sa[rng.randrange(len(sa))] for _ in sa]
        db = da if paired else [sb[rng.randrange(len(sb))] for _ in sb]
        ca = [a[(s, q)] for s in da for q in q_draw if (s, q) in a]
        cb = [b[(s, q)] for s in db for q in q_draw if (s, q) in b]
        boots.append(statistic(ca, cb))
    lo, hi = _quantiles(boots, level)
    est = statistic(list(a.values()), list(b.values()))
    how = "seeds resampled jointly (paired)" if paired else "seeds resampled per group"
    return Estimate(est, lo, hi, f"bootstrap: {how}, questions shared", len(a) + len(b))


def cluster_permutation_test(
    a: Sequence[Cluster], b: Sequence[Cluster], n_perm: int = 10000, seed: int = 0, alternative: str = "greater"
) -> float:
    """p-value of ``rate(a) - rate(b)`` against relabelling whole clusters between the two groups.

    Exact (every relabelling) when there are at most 20,000 of them, Monte-Carlo otherwise.
    ``alternative``: ``"greater"`` (a > b), ``"less"`` or ``"two-sided"``.
    """
    if alternative not in ("greater", "less", "two-sided"):
        raise ValueError("alternative must be 'greater', 'less' or 'two-sided'")
    a, b = list(a), list(b)
    pooled = a + b
    obs = _ratio(a) - _ratio(b)
    if math.isnan(obs):
        return math.nan  # an undefined rate (no answers in a denominator) has no p-value

    def stat(idx_a):
        sa = set(idx_a)
        return _ratio([pooled[i] for i in idx_a]) - _ratio([pooled[i] for i in range(len(pooled)) if i not in sa])

    def extreme(d):
        if math.isnan(d):  # a relabelling with an undefined rate counts against the observed effect
            return True
        if alternative == "greater":
            return d >= obs - 1e-12
        if alternative == "less":
            return d <= obs + 1e-12
        return abs(d) >= abs(obs) - 1e-12

    if math.comb(len(pooled), len(a)) <= 20000:
        combos = list(itertools.combinations(range(len(pooled)), len(a)))
        return sum(extreme(stat(c)) for c in combos) / len(combos)
    rng = random.Random(seed)
    hits = sum(extreme(stat(rng.sample(range(len(pooled)), len(a)))) for _ in range(n_perm))
    return (1 + hits) / (1 + n_perm)


def rank_p_value(observed: float, null: Sequence[float], alternative: str = "less") -> tuple[float, float]:
    """``(percentile, p)`` of ``observed`` among control effects ``null`` (e.g. K random directions).

    ``percentile`` is the share of controls at or below the observed value (0..100). ``p`` is the
    permutation p-value ``(1 + #{controls at least as extreme}) / (K + 1)``: with K = 16 the
    smallest possible p is 1/17 ≈ 0.059. ``alternative="less"`` asks whether the observed effect is
    more negative than the controls (a suppression), ``"greater"`` more positive.
    """
    if math.isnan(observed):
        return math.nan, math.nan  # e.g. no coherent persona answers under the EM definition: no p-value
    null = [x for x in null if not math.isnan(x)]
    if not null:
        raise ValueError("no control effects to compare with; run at least one random direction")
    pct = 100.0 * sum(x <= observed for x in null) / len(null)
    if alternative == "less":
        k = sum(x <= observed for x in null)
    elif alternative == "greater":
        k = sum(x >= observed for x in null)
    else:
        k = sum(abs(x) >= abs(observed) for x in null)
    return pct, (1 + k) / (1 + len(null))


def cluster_bootstrap_statistic(
    clusters: dict, statistic, n_boot: int = 2000, seed: int = 0, level: float = 0.95, unit: str = "clusters"
) -> Estimate:
    """Any statistic of clustered data with a percentile bootstrap interval over clusters.

    ``clusters`` maps a cluster id to that cluster's items (any object); ``statistic`` takes a
    list of clusters' items and returns a float (NaN results, e.g. an AUROC of a one-class
    resample, are dropped). Tuple ids ``(seed, cluster)`` are resampled crossed, as in
    :func:`cluster_bootstrap`.
    """
    if not clusters:
        raise ValueError("no clusters to bootstrap; pass {cluster_id: items}")
    ids = list(clusters)
    rng = random.Random(seed)
    boots = [statistic([clusters[i] for i in _resample_ids(ids, rng)]) for _ in range(n_boot)]
    lo, hi = _quantiles(boots, level)
    crossed = all(isinstance(i, tuple) and len(i) == 2 for i in ids)
    method = f"crossed cluster bootstrap (seeds x {unit})" if crossed else f"cluster bootstrap ({unit})"
    return Estimate(statistic(list(clusters.values())), lo, hi, method, len(clusters))
