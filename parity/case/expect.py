"""Reading `[expect]`: the mode, the outcome, tolerances, and what a negative control must be caught at."""

from __future__ import annotations

from parity.case import rules
from parity.case.fields import Choice, Integer, Number, kinds_of
from parity.case.reader import Reader
from parity.case.schema import TOLERANCE_KEYS, Expect, Statistical, Tolerance, default_tolerances
from parity.core.presets import param_names, probe_modules
from parity.core.records import PROBE_PHASES

EXPECT_KEYS = {"mode", "outcome", "tolerance", "first_divergence", "localized", "repeat", "statistical"}
FIRST_DIVERGENCE_SHAPE = ("a table { metric = \"loss\" | \"grad_norm\", step = N, and the effect: ratio = R "
                          "(other / reference at that step, within = 0.01 by default) or min_rel = X }")
LOCALIZED_SHAPE = ("a table { step = N, phase = \"forward\" | \"backward\" | \"update\", "
                   "name = \"layers.3.feed_forward\" }")


def read_expect(r: Reader, table: dict, setups) -> Expect:
    r.keys(table, EXPECT_KEYS, "expect.")
    given = r.declared({k: table[k] for k in ("repeat", "mode", "outcome") if k in table}, Expect, "expect.")
    mode, outcome = given.get("mode", Expect.mode), given.get("outcome", Expect.outcome)
    statistical = read_statistical(r, table.get("statistical"), mode, setups)
    tolerance, source = read_tolerance(r, table.get("tolerance", {}), setups)
    first = read_first_divergence(r, table.get("first_divergence"), outcome, statistical, setups)
    localized = read_localized(r, table.get("localized"), outcome, setups)
    expect = Expect(mode=mode, outcome=outcome, tolerance=tolerance, tolerance_source=source, first_divergence=first,
                    localized=localized, repeat=given.get("repeat"), statistical=statistical)
    r.fail_first(problem for rule in rules.EXPECT_RULES for problem in rule(expect))
    return expect


def read_tolerance(r: Reader, table: dict, setups) -> tuple[dict[str, Tolerance], dict[str, str]]:
    """The defaults for the lowest precision any setup computes in, with what the case sets: (bounds, source)."""
    dtype, tolerance = default_tolerances(setups)
    source = {m: f"default for {dtype}" for m in TOLERANCE_KEYS}
    r.keys(table, set(TOLERANCE_KEYS), "expect.tolerance.")
    for metric, bounds in table.items():
        key = f"expect.tolerance.{metric}"
        r.keys(bounds, {"rtol", "atol"}, key + ".")
        base = tolerance[metric]
        tolerance[metric] = Tolerance(rtol=r.check(f"{key}.rtol", bounds.get("rtol", base.rtol), Number()),
                                      atol=r.check(f"{key}.atol", bounds.get("atol", base.atol), Number()))
        source[metric] = "case"
    return tolerance, source


def read_first_divergence(r: Reader, first, outcome: str, statistical: Statistical | None, setups) -> dict | None:
    """Where a negative control must be caught: {metric, step, and ratio (+ within) or min_rel}."""
    if first is None:
        return None
    key = "expect.first_divergence"
    if outcome != "diverge":
        r.fail(key, "only for outcome = \"diverge\" (a negative control)")
    if not isinstance(first, dict):
        r.fail(key, f"must be {FIRST_DIVERGENCE_SHAPE}")
    r.keys(first, {"metric", "step", "ratio", "within", "min_rel"}, key + ".")
    steps = min(s.train.steps for s in setups)
    parsed = {"metric": r.check(f"{key}.metric", first.get("metric"), Choice(("loss", "grad_norm"))),
              "step": r.check(f"{key}.step", first.get("step"), Integer(1, steps))}
    if statistical and parsed["step"] % statistical.window and parsed["step"] != steps:
        w = statistical.window
        r.fail(f"{key}.step", f"{parsed['step']} ends no window: statistical mode judges means over "
               f"windows of {w} steps; allowed: a multiple of {w}, or the last step {steps}")
    # A control must be caught by the planted effect, not by a last-bit difference: it states the size.
    if ("ratio" in first) == ("min_rel" in first):
        r.fail(key, f"state the expected effect with exactly one of ratio, min_rel; allowed: {FIRST_DIVERGENCE_SHAPE}")
    if "ratio" in first:
        parsed["ratio"] = r.check(f"{key}.ratio", first["ratio"], Number(positive=True))
        parsed["within"] = r.check(f"{key}.within", first.get("within", 0.01), Number(positive=True))
    else:
        if "within" in first:
            r.fail(f"{key}.within", "goes with ratio; allowed: ratio = R, within = W")
        parsed["min_rel"] = r.check(f"{key}.min_rel", first["min_rel"], Number(positive=True))
    return parsed


def read_statistical(r: Reader, table, mode: str, setups) -> Statistical | None:
    """`[expect.statistical]`, with its defaults, for mode "statistical" (and only there)."""
    key = "expect.statistical"
    if mode != "statistical":
        if table is not None:
            r.fail(key, f"only for mode = \"statistical\" (this case's mode is {mode!r})")
        return None
    table = {} if table is None else table
    r.keys(table, set(kinds_of(Statistical)), key + ".")
    r.fail_first(rules.statistical_reference_is_builtin(setups))
    steps = min(s.train.steps for s in setups)
    base = Statistical()
    given = {name: table.get(name, getattr(base, name)) for name in ("members", "perturb", "window", "alpha")}
    st = Statistical(**r.declared(given, Statistical, key + ".", window=Integer(1, steps)))
    if st.alpha >= 1:
        r.fail(f"{key}.alpha", f"{table['alpha']!r} is not allowed; allowed: a number between 0 and 1")
    if st.perturb == "data" and setups[0].train.data is not None:
        r.fail(f"{key}.perturb", "\"data\" draws other batches with another seed, but a token file "
               "(train.data) is read in order whatever the seed; allowed: \"weights\"")
    return st


def read_localized(r: Reader, table, outcome: str, setups) -> dict | None:
    """Where a negative control's probes must first part: {step, phase, name} (see parity.verdict.localize)."""
    if table is None:
        return None
    key = "expect.localized"
    if outcome != "diverge":
        r.fail(key, "only for outcome = \"diverge\" (a negative control)")
    r.fail_first(rules.localized_setups_record_probes(setups))
    steps = min(s.train.steps for s in setups)
    if not isinstance(table, dict):
        r.fail(key, f"must be {LOCALIZED_SHAPE}")
    r.keys(table, {"step", "phase", "name"}, key + ".")
    step = r.check(f"{key}.step", table.get("step"), Integer(1, steps))
    phase = r.check(f"{key}.phase", table.get("phase"), Choice(PROBE_PHASES))
    name = table.get("name")
    cfg = setups[0].train.model_config
    names = probe_modules(cfg) if phase == "forward" else param_names(cfg)
    if name not in names:
        what = "a probed module" if phase == "forward" else "a parameter"
        r.fail(f"{key}.name", f"{name!r} is not {what} of model {setups[0].train.model} in phase {phase}; "
               f"allowed: {', '.join(names[:4])}, ... ({len(names)} in all)")
    return {"step": step, "phase": phase, "name": name}
