"""`parity.load(RUN)`: a run directory as DataFrames, every value exactly as the run files hold it."""

from __future__ import annotations

import struct
import subprocess
import sys

import pandas as pd
import pytest
from test_report import _metrics, make_case

import parity
from parity.core import records
from parity.core.errors import InputError


def bits(x: float) -> bytes:
    return struct.pack("<d", x)


def test_loss_values_equal_the_metrics_files_bit_for_bit(tmp_path):
    ref, other = _metrics(), _metrics(scale=1e-3)
    other[2]["loss"] = 0.1 + 0.2  # a value whose shortest repr has 17 digits
    make_case(tmp_path, "pair", {"ref": ref, "other": other}, mode="tolerance")
    run = parity.load(tmp_path)
    for setup in ("ref", "other"):
        text = (tmp_path / "pair" / setup / "metrics.csv").read_text().splitlines()
        column = text[0].split(",").index("loss")
        on_disk = [float(line.split(",")[column]) for line in text[1:]]
        loaded = run.metrics[(run.metrics.case == "pair") & (run.metrics.setup == setup)].sort_values("step")
        assert [bits(x) for x in loaded["loss"]] == [bits(x) for x in on_disk]
        assert list(loaded["step"]) == list(range(1, len(on_disk) + 1))
    assert run.metrics["loss"].dtype == "float64"


def test_pairs_say_where_each_first_diverged(tmp_path):
    make_case(tmp_path, "same", {"ref": _metrics(), "twin": _metrics()})
    make_case(tmp_path, "apart", {"ref": _metrics(), "drift": _metrics(scale=1e-2, start=5)}, mode="tolerance")
    pairs = parity.load(tmp_path).pairs.set_index("case")
    assert pairs.loc["same", "passed"] and pairs.loc["same", "other"] == "twin"
    assert pd.isna(pairs.loc["same", "diverged_metric"]) and pd.isna(pairs.loc["same", "diverged_step"])
    apart = pairs.loc["apart"]
    assert not apart["passed"] and apart["diverged_metric"] == "loss" and apart["diverged_step"] == 5
    verdict = records.read_json(tmp_path / "apart" / "verdict.json")
    assert bits(apart["diverged_rel"]) == bits(verdict["pairs"][0]["diverged"]["rel"])


def test_probes_come_in_long_form(tmp_path):
    make_case(tmp_path, "probed", {"ref": _metrics(), "other": _metrics()})
    rows = [{"step": 1, "phase": "forward", "name": "layers.0", "stat": "sumsq", "value": 0.1 + 0.2},
            {"step": 1, "phase": "backward", "name": "layers.0.w", "stat": "sumsq", "value": 1e-300}]
    records.write_probes(tmp_path / "probed" / "ref" / "probes.csv", rows)
    probes = parity.load(tmp_path).probes
    assert list(probes.columns) == ["case", "setup", "step", "phase", "name", "stat", "value"]
    assert probes.to_dict("records") == [{"case": "probed", "setup": "ref", **r} for r in rows]


def test_a_missing_folder_is_one_clear_error(tmp_path):
    with pytest.raises(InputError, match="not a run directory"):
        parity.load(tmp_path / "nowhere")


def test_importing_parity_loads_neither_pandas_nor_the_reader():
    code = "import sys, parity; print('pandas' in sys.modules, 'parity.runs' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split() \
        == ["False", "False"]
