"""Verdicts: the reference setup of a case against every other setup, metric by metric.

The public face of judging, by idea in its own module:

- parity.verdict.model: the verdict's schema (Verdict, Pair, MetricResult, Localization, BaselineCheck,
  StatisticalTest) and verdict.json's serialisation;
- parity.verdict.numbers: ulps, bitwise equality, entries;
- parity.verdict.series: a step-wise metric's or the final weights' two lanes, exact and tolerance;
- parity.verdict.pair: the pair verdict, lane by lane, and the outcome rules;
- parity.verdict.case_verdict: the case verdict (repeat check, ensemble, pairs, baselines), verdict.json;
- parity.verdict.formatting: what a person reads of it.
"""

from parity.verdict.case_verdict import (
    compare_case, load_run, load_runs, unjudged_verdict, verdict_path, with_baselines, write_verdict,
)
from parity.verdict.formatting import (
    band_text, device_counts, divergence_table, ensemble_lines, entry_text, format_verdict, ran_on, statistical_tests,
)
from parity.verdict.localize import probe_tolerances
from parity.verdict.model import STEP_METRICS
from parity.verdict.numbers import LISTED, bitwise_equal, ulp_unit, ulps_apart, ulps_text
from parity.verdict.pair import compare_pair
from parity.verdict.series import compare_series, compare_weights, not_compared, not_recorded, rounding

__all__ = [
    "LISTED", "STEP_METRICS", "band_text", "bitwise_equal", "compare_case", "compare_pair", "compare_series",
    "compare_weights", "device_counts", "divergence_table", "ensemble_lines", "entry_text", "format_verdict",
    "load_run", "load_runs", "not_compared", "not_recorded", "probe_tolerances", "ran_on", "rounding",
    "statistical_tests", "ulp_unit", "ulps_apart", "ulps_text", "unjudged_verdict", "verdict_path",
    "with_baselines", "write_verdict",
]
