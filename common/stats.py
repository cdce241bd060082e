"""The statistics of evaluate.py's report and of rating_kit.py's human ratings, written once so both compute alike.

A comparison of model A with model B over n paired units (prompts, or rated pairs) i = 1..n, with d_i the paired
difference (evaluate.py: s_i^A - s_i^B of per-prompt mean scores; rating_kit.py: x_i - 1/2 of the raters' mean vote):

    Delta = (1/n) sum_i d_i                          mean difference, with a BCa bootstrap interval over the units
    W = (1/n) sum_i (1[d_i > 0] + 1/2 1[d_i = 0])    win rate of A over B (ties count 1/2), BCa interval
    sign test:  #{d_i > 0} ~ Binomial(#{d_i != 0}, 1/2) under H0;   Wilcoxon signed-rank test of the nonzero d_i
    Holm:       p~_(m') = max_{j <= m'} min(1, (M - j + 1) p_(j))  over the M tests of a family

and, to plan a study, the exact power of the sign test and the number of untied pairs it needs (sign_test_power,
pairs_needed; docs/rating_kit.md uses them for the human ratings). Docs: docs/evaluate.md#implementation-details.

    from common.stats import bca_interval, holm, paired_comparison, sign_test, wilcoxon_test

This module imports neither evaluate.py nor rating_kit.py (tests/test_rating_kit.py checks it): both import it.
"""

import math

import numpy as np
import scipy.stats

from common.runtime import require


def bca_interval(x: np.ndarray, confidence: float, n_resamples: int, seed: int) -> tuple[float, float]:
    """scipy's BCa bootstrap interval of the mean of x (n,); a constant x gets a point (BCa is undefined there)."""
    if len(x) < 2 or np.ptp(x) == 0:
        return (float(x[0]), float(x[0])) if len(x) else (math.nan, math.nan)
    res = scipy.stats.bootstrap((x,), np.mean, confidence_level=confidence, n_resamples=n_resamples, method="BCa",
                                rng=np.random.default_rng(seed))
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


def sign_test(d: np.ndarray) -> tuple[int, int, int, float]:
    """(wins, ties, losses, two-sided p) of the sign test: wins ~ Binomial(wins + losses, 1/2) under H0."""
    wins, losses = int((d > 0).sum()), int((d < 0).sum())
    p = scipy.stats.binomtest(wins, wins + losses, 0.5).pvalue if wins + losses else 1.0
    return wins, len(d) - wins - losses, losses, float(p)


def wilcoxon_test(d: np.ndarray) -> float:
    """Two-sided Wilcoxon signed-rank p of the d_i; 1 if all are zero. Zero differences are dropped first (Wilcoxon's
    own rule), so scipy can use the exact null distribution for up to 50 nonzero d_i (with zeros it falls back to
    the normal approximation)."""
    d = d[d != 0]
    return float(scipy.stats.wilcoxon(d).pvalue) if len(d) else 1.0


def paired_comparison(scores_a: np.ndarray, scores_b: np.ndarray, confidence: float = 0.95,
                      n_resamples: int = 10_000, seed: int = 0) -> dict:
    """Model A against model B on one metric, the prompt as the unit. scores_*: (n prompts, k images), paired.

        s_i = mean_j scores_ij,  d_i = s_i^A - s_i^B,  w_i = 1[d_i > 0] + 1/2 1[d_i = 0]
        mean_a, mean_b, diff = mean_i d_i, win_rate = mean_i w_i, each with a BCa interval over the n prompts;
        p_sign (sign test on wins vs losses, ties dropped) and p_wilcoxon (signed-rank test of d), two-sided.
    """
    require(scores_a.shape == scores_b.shape, f"unpaired scores: {scores_a.shape} vs {scores_b.shape}")
    s_a, s_b = scores_a.mean(axis=1), scores_b.mean(axis=1)  # (n,)
    d = s_a - s_b  # (n,)
    w = (d > 0) + 0.5 * (d == 0)  # (n,)
    ci = lambda x: bca_interval(x, confidence, n_resamples, seed)  # noqa: E731
    wins, ties, losses, p_sign = sign_test(d)
    return dict(mean_a=float(s_a.mean()), ci_a=ci(s_a), mean_b=float(s_b.mean()), ci_b=ci(s_b),
                diff=float(d.mean()), ci_diff=ci(d), win_rate=float(w.mean()), ci_win=ci(w),
                wins=wins, ties=ties, losses=losses, p_sign=p_sign, p_wilcoxon=wilcoxon_test(d), n=len(d))


def holm(pvalues: list[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values, in the input order. With p_(1) <= ... <= p_(M),

        p~_(i) = max_{j <= i} min(1, (M - j + 1) p_(j));   reject H_(i) at level alpha iff p~_(i) <= alpha,

    which bounds the family-wise error rate by alpha under any dependence between the tests (Holm 1979).
    """
    order = np.argsort(pvalues, kind="stable")
    adjusted, running = [0.0] * len(pvalues), 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(pvalues) - rank) * pvalues[i]))
        adjusted[i] = running
    return adjusted


def holm_across(comparisons: list[dict], tests: tuple[str, ...] = ("p_sign", "p_wilcoxon")) -> None:
    """Holm over EVERY comparison x metric of the report, once per test: the family is all M = comparisons x metrics
    hypotheses a reader may pick a "significant" result from, not one comparison's metrics. Adds `<test>_holm` to
    each comparison's metrics[m], in place. comparisons: [{a, b, metrics: {metric: {p_sign, p_wilcoxon, ...}}}]."""
    cells = [s for c in comparisons for s in c["metrics"].values()]
    for test in tests:
        for s, adjusted in zip(cells, holm([s[test] for s in cells])):
            s[test + "_holm"] = adjusted


def seeds_comparison(runs_a: np.ndarray, runs_b: np.ndarray, confidence: float = 0.95, n_resamples: int = 10_000,
                     seed: int = 0) -> dict:
    """Model A against model B when either was trained with several seeds: the training seed is a unit too.
    runs_*: (S, n prompts, k images), S runs of one model on the same prompts and noise.

        a_si = mean_j runs_a[s, i, j],  b_ti likewise;   mean_a = mean_{s,i} a_si,  diff = mean_a - mean_b
        win_rate = mean_{s,t,i} (1[a_si > b_ti] + 1/2 1[a_si = b_ti])      (the mean over seeds of each seed's rate)
    Intervals: percentile bootstrap that resamples A's seeds, B's seeds and the prompts independently (Owen 2007's
    bootstrap for crossed factors), so disagreeing seeds widen them; with S = 3 seeds it runs short by about
    sqrt(2/3) on the seed part (the plug-in variance), stated in the report. p_sign / p_wilcoxon: the tests of
    paired_comparison on the seed-averaged d_i = mean_s a_si - mean_t b_ti (the prompt as unit).
    """
    require(runs_a.shape[1:] == runs_b.shape[1:], f"unpaired scores: {runs_a.shape} vs {runs_b.shape}")
    a, b = runs_a.mean(axis=2), runs_b.mean(axis=2)  # (S_a, n), (S_b, n)
    win = (a[:, None] > b[None]) + 0.5 * (a[:, None] == b[None])  # (S_a, S_b, n)
    rng = np.random.default_rng(seed)
    n = a.shape[1]
    stats = {"mean_a": [], "mean_b": [], "diff": [], "win_rate": []}
    for start in range(0, n_resamples, 500):  # chunks keep (R, S_a, S_b, n) small at n = 1,632 prompts
        r = min(500, n_resamples - start)
        ia, ib = rng.integers(len(a), size=(r, len(a))), rng.integers(len(b), size=(r, len(b)))
        ii = rng.integers(n, size=(r, n))
        ma = a[ia[:, :, None], ii[:, None, :]].mean(axis=(1, 2))  # (r,)
        mb = b[ib[:, :, None], ii[:, None, :]].mean(axis=(1, 2))
        w = win[ia[:, :, None, None], ib[:, None, :, None], ii[:, None, None, :]].mean(axis=(1, 2, 3))
        for key, v in zip(stats, (ma, mb, ma - mb, w)):
            stats[key].append(v)
    tail = 100 * (1 - confidence) / 2
    ci = {k: tuple(float(q) for q in np.percentile(np.concatenate(v), [tail, 100 - tail])) for k, v in stats.items()}
    d = a.mean(axis=0) - b.mean(axis=0)  # (n,) seed-averaged
    wins, ties, losses, p_sign = sign_test(d)
    return dict(mean_a=float(a.mean()), ci_a=ci["mean_a"], mean_b=float(b.mean()), ci_b=ci["mean_b"],
                diff=float(a.mean() - b.mean()), ci_diff=ci["diff"], win_rate=float(win.mean()),
                ci_win=ci["win_rate"], wins=wins, ties=ties, losses=losses, p_sign=p_sign, p_wilcoxon=wilcoxon_test(d),
                n=n, seeds_a=len(a), seeds_b=len(b), interval="crossed bootstrap over seeds and prompts")


def compare(runs_a: np.ndarray, runs_b: np.ndarray, confidence: float, n_resamples: int, seed: int) -> dict:
    """runs_* (S, n, k): one run each -> paired_comparison (BCa over prompts); several -> seeds_comparison."""
    if len(runs_a) == 1 and len(runs_b) == 1:
        return dict(paired_comparison(runs_a[0], runs_b[0], confidence, n_resamples, seed), seeds_a=1, seeds_b=1,
                    interval="BCa bootstrap over prompts")
    return seeds_comparison(runs_a, runs_b, confidence, n_resamples, seed)



def fmt(x: float, ci=None) -> str:
    """An estimate and its interval as the reports print them: 0.6123 [0.5512, 0.6701]."""
    return f"{x:.4g}" + (f" [{ci[0]:.4g}, {ci[1]:.4g}]" if ci is not None else "")


# ------------------------------------------------------------------------------------------------ planning


def sign_test_power(n, p1: float, alpha: float = 0.05):
    """Exact power of the two-sided sign test (sign_test) on n untied pairs when A wins each with probability p1.
    n: an int or an array of them. sign_test rejects at level alpha iff binomtest's two-sided p <= alpha; for
    H0: p = 1/2 the null is symmetric, so that p is 2 F(min(k, n - k)) with F the Binomial(n, 1/2) cdf, and

        c = max {k : 2 F(k) <= alpha}   (-1 if none);   reject iff k <= c or k >= n - c
        power = P(K <= c) + P(K >= n - c),   K ~ Binomial(n, p1)

    It is not monotone in n (the test is discrete): at p1 = 0.6, alpha = 0.05, n = 199 has 0.804 and n = 200 0.787.
    """
    n = np.asarray(n)
    c = scipy.stats.binom.ppf(alpha / 2, n, 0.5)  # the smallest k with F(k) >= alpha/2
    c = c - (scipy.stats.binom.cdf(c, n, 0.5) > alpha / 2)  # the largest with F(k) <= alpha/2
    return scipy.stats.binom.cdf(c, n, p1) + scipy.stats.binom.sf(n - c - 1, n, p1)


def pairs_needed(p1: float = 0.6, alpha: float = 0.05, power: float = 0.8, n_max: int = 5000) -> int:
    """The untied pairs the two-sided sign test needs to detect a win rate p1 at level alpha with the given power:
    the smallest n with sign_test_power(m, p1, alpha) >= power for every m from n to n_max. "Every m", because the
    power saw-tooths: the first n that reaches the target can be followed by a smaller one that does not (at p1 = 0.6
    n = 199 reaches 0.804, n = 200 has 0.787). Pairs the raters call a tie carry no sign: with a fraction t of ties,
    plan n / (1 - t) pairs. Under Holm over m tests the smallest p is held to alpha / m: plan with alpha / m."""
    require(0 < alpha < 1 and 0 < power < 1 and p1 != 0.5, f"pairs_needed: alpha {alpha}, power {power} must be in "
            f"(0, 1) and p1 {p1} not 1/2")
    ns = np.arange(1, n_max + 1)
    short = np.flatnonzero(sign_test_power(ns, p1, alpha) < power)  # indices of the n below the target
    require(len(short) == 0 or short[-1] < n_max - 1, f"pairs_needed: more than n_max = {n_max} pairs needed")
    return int(ns[short[-1] + 1]) if len(short) else 1
