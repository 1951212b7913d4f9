"""The pytest markers a case carries: where it can run, how many ranks its largest setup needs, and the
trainers its setups name other than parity's own (each trainer describes its marker: parity.trainers)."""

from __future__ import annotations

from collections.abc import Mapping

from parity.case.attention import attention_problem
from parity.case.schema import Case
from parity.case.trainer import BUILTIN

WORLD_MARKERS = {1: "1gpu", 2: "2gpu", 4: "4gpu", 8: "8gpu"}
MARKERS = {
    "cpu": "case runs on CPU with gloo ranks (SDPA math or flash; the CPU build has no efficient or cudnn kernel)",
    "1gpu": "largest setup needs 1 rank",
    "2gpu": "largest setup needs 2 ranks",
    "4gpu": "largest setup needs 3-4 ranks",
    "8gpu": "largest setup needs 5-8 ranks",
    "multinode": "largest setup needs more than 8 ranks",
    "parity_case": "a parity case (one item per cases/*.toml)",
    "slow": "trains or starts ranks: every case item, and such tests (`-m \"not slow\"` is the fast tier)",
}


def markers_for(case: Case) -> list[str]:
    """The markers of one case: cpu where every setup can run there, its world-size marker, its trainers'."""
    names = []
    if all(attention_problem(case, s, "cpu") is None for s in case.setups):
        names.append("cpu")
    names.append(next((m for n, m in WORLD_MARKERS.items() if case.world_size <= n), "multinode"))
    names += sorted({s.trainer for s in case.setups} - {BUILTIN})
    return names


def marker_docs(trainers: Mapping) -> dict[str, str]:
    """Every marker a case may carry, described: MARKERS, then each trainer's (`marker`, where it has one)."""
    return {**MARKERS, **{name: t.marker for name, t in trainers.items() if getattr(t, "marker", None)}}
