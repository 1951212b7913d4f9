"""Triage of a failed baseline comparison: environment drift, or numerics that changed.

A run that fails its stored baseline (parity.verdict.baselines) failed for one of two reasons, and a
reviewer treats them differently:

- "drift" (environment drift): compared exactly, not bitwise, yet every compared step of every metric
  within the case's calibrated tolerance. That is what another driver, library build or kernel choice
  does to the last bits, and what `--update-baselines=drift` may accept. Recorded: the first entry that
  is not bitwise and the largest relative difference.
- "changed" (numerics changed): some step beyond tolerance; or, compared within tolerance or against the
  ensemble because the platform fields differ, failing at all; or a run that could not be judged step
  for step (steps missing or extra, an ensemble that did not finish: the line names the problem, and no
  entry is recorded). Recorded: the first failing entry, its step and metric.

A baseline holds loss and grad norm only, so it cannot say which module changed. A changed triage's
`where` says what can, and no more: the run's probes need a second run to be compared against, and the
case's pairs localise differences between setups, which is another question than the baseline's.
"""

from __future__ import annotations

from collections.abc import Callable

from parity.verdict.localize import rel_text
from parity.verdict.model import MetricResult, Pair, Triage

DRIFT, CHANGED = "drift", "changed"


def triage(basis: str, metrics: dict[str, MetricResult], where: str) -> Triage | None:
    """The triage of a baseline comparison on `basis` ("exact", "tolerance" or "statistical") with these
    metric results; None where every metric passed. `where`: the localisation note a changed triage keeps."""
    if all(m.passed for m in metrics.values()):
        return None
    max_rel = max((m.max_rel for m in metrics.values()), default=0.0)
    if basis == "exact" and all(m.within_tolerance for m in metrics.values()):
        metric, e = _first(metrics, lambda m: m.first_not_bitwise)
        return Triage(DRIFT, metric, e["step"], e, max_rel, "",
                      f"environment drift: not bitwise from step {e['step']} ({metric}), every step within "
                      f"tolerance (max rel {rel_text(max_rel)})")
    unjudged = next(((name, m.problems[0]) for name, m in metrics.items() if m.problems), None)
    if unjudged is not None:  # no step to name: say what kept the run from being judged step for step
        name, problem = unjudged
        return Triage(CHANGED, None, None, None, max_rel, where,
                      f"not drift: {name} could not be judged step for step ({problem})")
    mode = "statistical" if basis == "statistical" else "tolerance"
    metric, e = _first({n: m for n, m in metrics.items() if not m.passed}, lambda m: m.first_failing(mode))
    if "window" in e:
        at = (f"outside the ensemble's spread at steps {e['window'][0]}-{e['window'][1]} (rel {rel_text(e['rel'])}, "
              f"z {e['z']:.3g})")
    else:
        at = f"beyond tolerance at step {e['step']} (rel {rel_text(e['rel'])})"
    return Triage(CHANGED, metric, e["step"], e, max_rel, where, f"numerics changed: {metric} {at}")


def _first(metrics: dict[str, MetricResult], pick: Callable[[MetricResult], dict | None]) -> tuple[str, dict]:
    """(metric, entry) of the earliest step `pick` gives an entry for; on a tie, the first metric."""
    found = [(name, e) for name, m in metrics.items() if (e := pick(m)) is not None]
    return min(found, key=lambda found_entry: found_entry[1]["step"])


def localisation_note(setup: str, probed: bool, commit: str | None, pairs: list[Pair], locate: str) -> str:
    """What can say which module a changed baseline points at, for a setup's run: its probes against a second
    run (`commit`: the git commit the baseline was made at, where it says), and the case's pairs that localised
    a difference (`locate`: the command that shows them)."""
    note = "a baseline holds loss and grad norm only, so it cannot say which module changed"
    if probed:
        at = f", e.g. one made at the baseline's commit {commit}" if commit and commit != "unknown" else ""
        note += f"; this run recorded probes, and localising needs a second run to compare them against{at}"
    else:
        note += "; this run recorded no probes"
    parted = [f"{p.reference} vs {p.other} {p.localization.line}" for p in pairs
              if setup in (p.reference, p.other) and p.localization and p.localization.first]
    if parted:
        note += ("; between setups, not against the baseline, the case's pairs part: " + "; ".join(parted)
                 + f" ({locate})")
    return note
