"""A pair's headline: the one first divergence a reader sees, taken in causal order across every lane.

Within a step, numbers are produced in this order: the forward probes, the loss, the backward probes (the
gradients), the grad norm, the update probes; the final weights come after every step. The headline is the
earliest entry in that order that fails under its lane's mode: beyond tolerance (mode "tolerance"), not
bitwise equal (mode "bitwise") or outside the ensemble's band (mode "statistical", where the probes are
expected to part and do not count). So a planted gradient bug is named at its gradient, and not at the first
parameter of the weights lane that it later moved.

Two things are never given one label: the first entry that is *not bitwise* equal, and the first *beyond
tolerance*. A pair that passed within tolerance still says where its first bit-level difference is.

A negative control's headline says why it passed: the effect its case declares, found where it declares it.
"""

from __future__ import annotations

import math

from parity.case.schema import Case
from parity.verdict.model import BASIS, Headline, Localization, MetricResult
from parity.verdict.numbers import short, ulps_text

# Position within a step of each lane's numbers; the weights after all steps.
ORDER = {"forward": 0, "loss": 1, "backward": 2, "grad_norm": 3, "update": 4, "weights": 5}


def causal_key(lane: str, e: dict) -> tuple:
    """Where an entry of a lane ("probes", a step metric or "weights") falls in causal order."""
    if lane == "weights":
        return math.inf, ORDER["weights"]
    return e["step"], ORDER[e["phase"] if lane == "probes" else lane]


def _earliest(found: list[tuple[str, dict]]) -> tuple[str, dict] | None:
    found = [(lane, e) for lane, e in found if e is not None]
    return min(found, key=lambda f: causal_key(*f)) if found else None


def first_failing(metrics: dict[str, MetricResult], modes: dict[str, str], loc: Localization | None,
                  mode: str) -> tuple[str, dict] | None:
    """(lane, entry) of the earliest entry that fails under its lane's mode; None when nothing does."""
    found = [(name, m.first_failing(modes[name])) for name, m in metrics.items() if not m.not_recorded]
    if loc and mode != "statistical":
        found.append(("probes", loc.first))
    return _earliest(found)


def first_not_bitwise(metrics: dict[str, MetricResult], probes_not_bitwise: dict | None) -> tuple[str, dict] | None:
    """(lane, entry) of the earliest entry that is not bitwise equal; None when every compared entry is."""
    found = [(name, m.first_not_bitwise) for name, m in metrics.items() if not m.not_recorded]
    return _earliest(found + [("probes", probes_not_bitwise)])


def where_text(lane: str, e: dict) -> str:
    """ "step 1, backward, layers.2.attention.wq.weight", "loss at step 3", "weights, param layers.0.w",
    "loss over steps 26-50"."""
    if lane == "probes":
        return f"step {e['step']}, {e['phase']}, {e['name']}" + ("" if e.get("stat", "sumsq") == "sumsq"
                                                                 else f" ({e['stat']})")
    if lane == "weights":
        return f"weights, param {e['param']}" + (f" sketch{e['sketch']}" if "sketch" in e else "")
    if "window" in e:
        return f"{lane} over steps {e['window'][0]}-{e['window'][1]}"
    return f"{lane} at step {e['step']}"


ULPS_SAY_MORE = 1e-3  # beyond this relative difference a count of ulps tells a reader nothing the rel does not


def size_text(e: dict) -> str:
    """The size of a difference, relative first: "rel 3.7e-08, <1 f32 ulp", "rel 3.0" or
    "rel 0.037, z 41.3 (limit 7.02)"."""
    rel = e["rel"]
    text = f"rel {short(rel, 2)}"
    if "z" in e:
        return f"{text}, z {e['z']:.3g} (limit {e['limit']:.3g})"
    small = isinstance(rel, float) and rel < ULPS_SAY_MORE
    return f"{text}, {ulps_text(e)}" if "ulps" in e and e["ulps"] is not None and small else text


def _found_text(lane: str, e: dict) -> str:
    return f"{where_text(lane, e)} ({size_text(e)})"


def headline(case: Case, metrics: dict[str, MetricResult], modes: dict[str, str], loc: Localization | None,
             probes_not_bitwise: dict | None, problems: list[str]) -> Headline:
    """The pair's headline (see the module docstring); `problems`: the pair's, none when it passed."""
    mode = case.expect.mode
    failing = first_failing(metrics, modes, loc, mode)
    exact = first_not_bitwise(metrics, probes_not_bitwise)
    lane, e = failing or (None, None)
    basis = BASIS[modes.get(lane, mode)] if failing else None  # the probes lane is judged in the case's mode
    if failing is None:
        # No entry fails, yet a run that crashed or could not be read is no agreement: its first problem says why.
        text = problems[0] if problems else _agreeing_text(mode, exact)
    else:
        text = f"first {basis}: {_found_text(lane, e)}"
        if case.expect.outcome == "diverge" and not problems:
            text = _control_text(case, lane, e, metrics, modes) or f"diverged as a control must: {text}"
    return Headline(text=text, lane=lane, basis=basis, entry=e,
                    not_bitwise_lane=exact[0] if exact else None, not_bitwise=exact[1] if exact else None)


def _agreeing_text(mode: str, exact: tuple[str, dict] | None) -> str:
    if exact is None:
        return "bitwise equal: every compared entry"
    nothing = f"nothing {BASIS['statistical' if mode == 'statistical' else 'tolerance']}"
    return f"{nothing}; first {BASIS['bitwise']}: {_found_text(*exact)}"


def _control_text(case: Case, lane: str, e: dict, metrics: dict[str, MetricResult],
                  modes: dict[str, str]) -> str | None:
    """A passing control's reason: the effect its case declares, where it declares it."""
    want = case.expect.localized
    if want and lane == "probes":
        return f"declared effect found: {_found_text(lane, e)}"
    want = case.expect.first_divergence
    if want:
        declared = metrics[want["metric"]].first_failing(modes[want["metric"]])
        if declared is not None:
            return f"declared effect found: {_found_text(want['metric'], declared)}"
    return None
