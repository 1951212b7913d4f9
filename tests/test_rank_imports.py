"""The code that runs inside ranks records numbers; it imports nothing that judges or launches."""

import subprocess
import sys

JUDGING_OR_LAUNCHING = {"parity.verdict.baselines", "parity.verdict.compare", "parity.run.launch", "parity.run.runner", "parity.report.pages",
                        "parity.cli", "parity.plugin"}


def test_rank_entry_imports_neither_the_verdict_side_nor_the_launcher():
    code = "import sys, parity.rank.train; print(' '.join(m for m in sys.modules if m.startswith('parity')))"
    loaded = set(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split())
    assert "parity.rank.train" in loaded and "parity.core.lifeline" in loaded
    assert loaded & JUDGING_OR_LAUNCHING == set()
