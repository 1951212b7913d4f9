"""The baseline update modes: their names and what each may write. The one list that both front ends parse
(`parity ... --update-baselines[=MODE]`, `pytest --parity-update-baselines[=MODE]`, through parity.options) and
parity.verdict.baselines applies (write_policy); kept apart so that reading a command line loads no verdict code."""

from __future__ import annotations

UPDATE_MODES = ("failing", "new", "all", "drift")  # the first is what a bare flag means
REWRITING = ("failing", "all")  # the modes that replace any mismatching or unreadable baseline
# The modes that write a missing baseline: only they may find the baseline root missing and create it.
WRITES_MISSING = ("failing", "new", "all")
METAVAR = "{" + ",".join(UPDATE_MODES) + "}"
HELP = ("write baselines: failing (the default) writes missing and mismatching ones; new, missing ones only; all, "
        "every one; drift, only a mismatching one whose triage is environment drift (every step within "
        "tolerance), never a missing one")
