"""Statistical mode: over hundreds of steps, is a setup's gap to the reference noise, or a bug?

Two layouts that are not bitwise equal drift apart: a last-bit difference grows until, after a few
hundred steps, their losses differ by more than any per-step tolerance that would still catch a bug.
So the reference is trained K more times, the *ensemble*, each member perturbed the way a correct
change perturbs it (`[expect.statistical] perturb`, parity.case.schema.PERTURBATIONS): by default every
seed-checkpoint weight times (1 + eps z), a few ULPs, the size of a changed reduction order. How far
the members spread is how far a correct setup may drift.

The test, per setup, on windows of `window` steps: each run's median loss, and median log grad norm
(so that a grad norm is judged by its ratio), per window. A median, because chaotic runs have
single-step grad-norm spikes at random times, and one spike must not move its window (docs/measured.md
has the measurement behind this).
Over the K members a window has mean m and standard deviation s; a setup's window value x gives

    z = (x - m) / (s * sqrt(1 + 1/K))

which for a new draw from the members' (normal) population is Student's t with K - 1 degrees of
freedom: a prediction interval. The setup fails when any |z| passes t_{K-1}(1 - alpha / 2n), n its
windows times metrics (Bonferroni), so a correct setup fails with probability at most alpha. Where
the members agree more closely than the case's tolerance (the early steps, before the drift has
grown), s is raised to that tolerance at the window's mean (`sd_used`): there two runs differ by
rounding, which tolerance mode judges already, and the test is that tolerance check on window medians.
This follows Megatron-LM's golden values, whose tolerance comes from the spread of repeated runs,
with a stated error rate in place of its multiplier; benchmarks/ensemble_study.md measures both.

Pure numbers: nothing here imports torch or reads files.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np

from parity.case.schema import Statistical, Tolerance
from parity.verdict.model import StatisticalTest

METRICS = ("loss", "grad_norm")
LOG_METRICS = ("grad_norm",)  # tested as logarithms: a grad norm's natural error is a ratio


def t_cdf(x: float, df: int) -> float:
    """Student's t distribution function for integer df, in closed form (Abramowitz and Stegun 26.7.3-4):
    with theta = atan(|x| / sqrt(df)), P(|T| <= |x|) is a finite series in sin and cos of theta."""
    theta = math.atan(abs(x) / math.sqrt(df))
    s, c2 = math.sin(theta), math.cos(theta) ** 2
    if df % 2:  # odd: (2/pi) (theta + sin cos (1 + 2/3 cos^2 + 2*4/(3*5) cos^4 + ...)), up to cos^(df-2)
        term = total = math.cos(theta) if df > 1 else 0.0
        for j in range(1, (df - 1) // 2):
            term *= c2 * (2 * j) / (2 * j + 1)
            total += term
        inside = 2 / math.pi * (theta + s * total)
    else:  # even: sin (1 + 1/2 cos^2 + 1*3/(2*4) cos^4 + ...), up to cos^(df-2)
        term = total = 1.0
        for j in range(0, df // 2 - 1):
            term *= c2 * (2 * j + 1) / (2 * j + 2)
            total += term
        inside = s * total
    return 0.5 + math.copysign(inside / 2, x)


@lru_cache(maxsize=None)
def t_quantile(p: float, df: int) -> float:
    """The x with t_cdf(x, df) = p, for 0.5 <= p < 1, by bisection."""
    lo, hi = 0.0, 1e4
    for _ in range(80):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if t_cdf(mid, df) < p else (lo, mid)
    return (lo + hi) / 2


def limit(k: int, alpha: float, tests: int) -> float:
    """The largest |z| a setup may show in any of its `tests` windows x metrics, against K members."""
    return t_quantile(1 - alpha / (2 * tests), k - 1)


def window_ends(steps: np.ndarray, window: int) -> np.ndarray:
    """The last step of each window: every `window` steps, and a shorter last window if the steps do not divide."""
    n = len(steps)
    return steps[[*range(window - 1, n, window), *([n - 1] if n % window else [])]] if n else steps


def window_values(values: np.ndarray, window: int, metric: str) -> np.ndarray:
    """Median per window, in test space (a log for LOG_METRICS). A median, not a mean: a chaotic run has
    single-step spikes at random times, and one spike must not move its window. NaN or Inf anywhere in a
    window makes it NaN."""
    v = np.asarray(values, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        v = np.log(v) if metric in LOG_METRICS else v
    v = np.where(np.isfinite(v), v, np.nan)
    full = len(v) // window * window
    medians = np.median(v[:full].reshape(-1, window), axis=1) if full else np.empty(0)
    return np.append(medians, np.median(v[full:])) if full < len(v) else medians


def shown(x: np.ndarray, metric: str) -> np.ndarray:
    """Test-space values back in the metric's units (a grad norm window's median)."""
    return np.exp(x) if metric in LOG_METRICS else x


class Band:
    """One metric's windows over the members: mean, sd, the sd used (floored at the case's tolerance), and
    `scale`, what a difference from the mean is divided by to give z."""

    def __init__(self, members: np.ndarray, metric: str, tol: Tolerance):
        self.metric, self.k = metric, len(members)
        self.mean = members.mean(axis=0)
        self.sd = members.std(axis=0, ddof=1)
        centre = shown(self.mean, metric)
        floor = tol.bound(centre)
        if metric in LOG_METRICS:  # the tolerance of a value is a relative one of its logarithm
            floor = floor / np.abs(centre)
        self.at_floor = self.sd < floor
        self.sd_used = np.maximum(self.sd, floor)
        self.scale = self.sd_used * math.sqrt(1 + 1 / self.k)  # a new draw's spread about an estimated mean

    def z(self, values: np.ndarray) -> np.ndarray:
        """(values - mean) / scale; 0 where they are equal, even at a zero scale (a zero tolerance and members
        that agree to the bit), and infinite where they differ there."""
        diff = values - self.mean
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(diff == 0, 0.0, diff / self.scale)


def test(values: np.ndarray, band: Band, ends: np.ndarray, lim: float) -> StatisticalTest:
    """One setup's windows against the band: z per window, and the first window where |z| passes `lim`
    (NaN never passes: a window with a non-finite value fails)."""
    z = band.z(values)
    failing = np.flatnonzero(~(np.abs(z) <= lim))
    first = None
    if failing.size:
        i = int(failing[0])
        ref, other = float(shown(band.mean[i], band.metric)), float(shown(values[i], band.metric))
        first = {"step": int(ends[i]), "window": [int(ends[i - 1]) + 1 if i else 1, int(ends[i])],
                 "value_ref": ref, "value_other": other, "abs": abs(other - ref),
                 "rel": abs(other - ref) / abs(ref) if ref else math.inf, "z": float(z[i]), "limit": lim}
    finite = z[np.isfinite(z)]
    return StatisticalTest(passed=first is None, values=shown(values, band.metric).tolist(), z=z.tolist(),
                           max_abs_z=float(np.abs(finite).max()) if finite.size else math.nan,
                           failing_windows=int(failing.size), first_failure=first)


def series_at(run: dict, metric: str, steps: np.ndarray) -> np.ndarray:
    """A run's metric at the given steps (NaN where it has no such step, or no metrics at all)."""
    cols = run.get("metrics")
    if cols is None:
        return np.full(len(steps), np.nan)
    by_step = dict(zip(cols["step"].tolist(), cols[metric].tolist()))
    return np.array([by_step.get(s, math.nan) for s in steps.tolist()], dtype=np.float64)


def member_problems(name: str, run: dict, steps: np.ndarray) -> list[str]:
    """Why a member cannot widen the band: it did not finish, or lacks a step, or has NaN/Inf."""
    if run["problems"]:
        return [f"ensemble member {p}" for p in run["problems"]]
    bad = [m for m in METRICS if not np.isfinite(series_at(run, m, steps)).all()]
    return [f"ensemble member {name}: {m} is missing at some step of the reference's, or not finite" for m in bad]


def evaluate(st: Statistical, tolerance: dict[str, Tolerance], steps: np.ndarray, members: dict[str, dict],
             setups: dict[str, dict]) -> dict:
    """The ensemble and each setup's test. `members` and `setups`: runs (parity.verdict.case_verdict.load_run) by name;
    `steps`: the reference's. Returns {summary, tests: {setup: {metric: test}}, problems}; with problems
    (a member that did not finish, say) there is no band and no test."""
    problems = [p for name, run in members.items() for p in member_problems(name, run, steps)]
    k, ends = len(members), window_ends(steps, st.window)
    tests_n = len(ends) * len(METRICS)
    lim = limit(k, st.alpha, tests_n)
    summary = {"members": list(members), "k": k, "perturb": st.perturb, "window": st.window, "alpha": st.alpha,
               "metrics": list(METRICS), "tests": tests_n, "limit": lim, "window_ends": ends.tolist(),
               "bands": {}, "windows_at_floor": {}, "held_out": []}
    if problems or not len(steps):
        return {"summary": summary, "tests": {}, "problems": problems or ["the reference recorded no steps"]}
    windows = {m: {name: window_values(series_at(run, m, steps), st.window, m) for name, run in members.items()}
               for m in METRICS}
    bands = {m: Band(np.stack(list(windows[m].values())), m, tolerance[m]) for m in METRICS}
    for m, b in bands.items():
        half = lim * b.scale
        summary["bands"][m] = {"mean": shown(b.mean, m).tolist(), "sd": b.sd.tolist(), "sd_used": b.sd_used.tolist(),
                               "low": shown(b.mean - half, m).tolist(), "high": shown(b.mean + half, m).tolist(),
                               "members": {name: shown(v, m).tolist() for name, v in windows[m].items()}}
        summary["windows_at_floor"][m] = int(b.at_floor.sum())
    tests = {name: {m: test(window_values(series_at(run, m, steps), st.window, m), bands[m], ends, lim)
                    for m in METRICS} for name, run in setups.items()}
    summary["held_out"] = held_out(st, tolerance, windows, ends, tests_n)
    return {"summary": summary, "tests": tests, "problems": []}


def held_out(st: Statistical, tolerance: dict[str, Tolerance], windows: dict, ends: np.ndarray, tests_n: int) -> list:
    """Each member tested against the other K - 1: the same config with another perturbation, so a measured
    false alarm on every run (informative; the case's verdict does not rest on it)."""
    names = list(windows[METRICS[0]])
    lim = limit(len(names) - 1, st.alpha, tests_n)
    out = []
    for name in names:
        worst, passed = 0.0, True
        for m in METRICS:
            rest = np.stack([v for other, v in windows[m].items() if other != name])
            t = test(windows[m][name], Band(rest, m, tolerance[m]), ends, lim)
            worst, passed = max(worst, t.max_abs_z / lim), passed and t.passed
        out.append({"member": name, "passed": passed, "max_abs_z_over_limit": worst})
    return out


def drift(base: np.ndarray, run: np.ndarray, members: list[np.ndarray], metric: str, st: Statistical,
          tol: Tolerance) -> StatisticalTest:
    """A stored baseline against this run of the same setup, on a machine whose bits differ (another CPU
    instruction set, say): two draws of one config, so per window z = (run - baseline) / (s sqrt 2), s the
    ensemble's floored sd, against the limit of a setup's test. All series are aligned on the run's steps."""
    ends = window_ends(np.arange(1, len(run) + 1), st.window)
    band = Band(np.stack([window_values(v, st.window, metric) for v in members]), metric, tol)
    band.mean, band.scale = window_values(base, st.window, metric), band.sd_used * math.sqrt(2)
    return test(window_values(run, st.window, metric), band, ends, limit(band.k, st.alpha, len(ends) * len(METRICS)))
