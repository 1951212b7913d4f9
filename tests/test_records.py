"""The record readers: whole columns at a time, every double back bit for bit, one error line per bad file."""

from __future__ import annotations

import math
import sys

import numpy as np
import pytest

from parity.core import records

TRICKY = [
    0.1, 1 / 3, 2 / 3, 1e-7, 123456789.123456789, 9007199254740993.0, 1e22, 1e23,
    5e-324,  # the smallest subnormal
    2.225073858507201e-308,  # the largest subnormal
    2.2250738585072014e-308,  # the smallest normal
    sys.float_info.max, -sys.float_info.max, 0.0, -0.0,
    float(np.float32(0.1)), float(np.float32(8.074957)),  # float32 numbers widened to doubles
]


def _bits(values) -> list[int]:
    return np.asarray(values, dtype=np.float64).view(np.int64).tolist()


def _with_neighbours(values: list[float]) -> list[float]:
    """Each value and the doubles one ulp either side: the first ones a lossy parser would land on instead."""
    out = []
    for x in values:
        with np.errstate(over="ignore"):  # the largest double's neighbour is inf: left out
            below, above = float(np.nextafter(x, -math.inf)), float(np.nextafter(x, math.inf))
        out += [v for v in (below, x, above) if math.isfinite(v)]
    return out


def test_every_double_reads_back_bit_for_bit(tmp_path):
    rng = np.random.default_rng(7)
    random_doubles = rng.integers(0, 2**63 - 1, 2000, dtype=np.int64).view(np.float64)  # every exponent
    values = _with_neighbours(TRICKY) + [float(x) for x in random_doubles if math.isfinite(x)]
    values += [math.nan, math.inf, -math.inf]  # as format_value writes them: 'nan', 'inf', '-inf'
    path = tmp_path / "metrics.csv"
    records.write_metrics(path, [{"step": i + 1, "loss": x, "grad_norm": -x} for i, x in enumerate(values)])
    columns = records.read_metric_columns(path)
    finite = [math.isfinite(x) for x in values]
    assert columns["loss"].dtype == np.float64 and columns["step"].dtype == np.int64
    assert columns["step"].tolist() == list(range(1, len(values) + 1))
    got = columns["loss"]
    assert _bits(got[finite]) == _bits([x for x, f in zip(values, finite) if f])
    assert _bits(columns["grad_norm"][finite]) == _bits([-x for x, f in zip(values, finite) if f])
    assert math.isnan(got[-3]) and got[-2] == math.inf and got[-1] == -math.inf
    # The rows built from the columns hold the same doubles, as Python floats.
    rows = records.read_metrics(path)
    assert all(type(r["loss"]) is float and type(r["step"]) is int for r in rows)
    assert _bits([r["loss"] for r in rows][:-3]) == _bits(values[:-3])


def test_quoted_cells_read_exactly_too(tmp_path):
    """A parameter name with a comma is quoted by the writer: the reader takes the csv module's path."""
    rows = [{"param": "odd,name", "norm": 0.1 + 0.2, "sha256": "a" * 64},
            {"param": "plain", "norm": 5e-324, "sha256": "b" * 64}]
    path = tmp_path / "weights.csv"
    records.write_weights(path, rows)
    assert '"odd,name"' in path.read_text()
    back = records.read_weights(path)
    assert [r["param"] for r in back] == ["odd,name", "plain"]
    assert _bits([r["norm"] for r in back]) == _bits([0.1 + 0.2, 5e-324])


HEADER = "step,loss,grad_norm\n"
BAD = [
    ("number", HEADER + "1,0.5,0.1\n2,abc,0.1\n", r":3: column 'loss': 'abc' is not a number"),
    ("fields", HEADER + "1,0.5\n", r":2: 2 fields, expected 3 \(step,loss,grad_norm\)"),
    # The first bad line is named, whichever column or check fails there.
    ("first line wins", HEADER + "1,0.5,0.1\n2,0.5,x\n3,y,0.1\n", r":3: column 'grad_norm': 'x' is not a number"),
    ("fields before numbers", HEADER + "1,0.5\n2,0.5,x\n", r":2: 2 fields"),
    ("missing column", "step,loss\n1,2\n", r":1: missing column\(s\) grad_norm; the header has step,loss"),
    ("no header", "", r": no header row"),
    ("header lines count", "# a: b\n# c: d\n" + HEADER + "1,x,0.1\n", r":4: column 'loss': 'x' is not a number"),
    ("bad header line", "# nocolon\n" + HEADER, r":1: header line is not '# key: value'"),
    ("empty line", HEADER + "1,0.5,0.1\n\n2,0.5,0.1\n", r":3: 0 fields, expected 3"),
    ("step not an integer", HEADER + "1.5,0.5,0.1\n", r":2: column 'step': '1.5' is not a number"),
    ("step out of range", HEADER + "99999999999999999999,0.5,0.1\n", r":2: column 'step': '9+' is out of range"),
    ("quoted", HEADER + '1,"0.5",0.1\n2,"x",0.1\n', r":3: column 'loss': 'x' is not a number"),
    ("trailing comma", HEADER + "1,0.5,0.1,\n", r":2: 4 fields, expected 3"),
]


@pytest.mark.parametrize(("content", "message"), [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_a_bad_file_is_one_line_naming_file_and_line(tmp_path, content, message):
    path = tmp_path / "metrics.csv"
    path.write_text(content)
    with pytest.raises(records.RecordError, match=rf"^{path}{message}") as e:
        records.read_metric_columns(path)
    assert "\n" not in str(e.value)
    with pytest.raises(records.RecordError, match=message):  # the rows reader says the same
        records.read_metrics(path)


def test_binary_and_missing_files(tmp_path):
    (tmp_path / "metrics.csv").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(records.RecordError, match="not a text file"):
        records.read_metric_columns(tmp_path / "metrics.csv")
    with pytest.raises(records.RecordError, match="cannot read"):
        records.read_metric_columns(tmp_path / "absent.csv")


def test_a_file_of_only_a_header_has_empty_columns(tmp_path):
    (tmp_path / "metrics.csv").write_text(HEADER)
    columns = records.read_metric_columns(tmp_path / "metrics.csv")
    assert {k: len(v) for k, v in columns.items()} == {"step": 0, "loss": 0, "grad_norm": 0}
    assert records.read_metrics(tmp_path / "metrics.csv") == []


def test_lenient_reading_keeps_the_steps_of_a_run_without_run_json(tmp_path):
    records.write_metrics(tmp_path / "metrics.csv", [{"step": 1, "loss": 0.5, "grad_norm": 0.25}])
    with pytest.raises(records.RecordError, match="run.json"):
        records.read_setup_run(tmp_path)  # strict: bad input
    run = records.read_setup_run(tmp_path, lenient=True)  # a report draws what there is
    assert run["metrics"]["loss"].tolist() == [0.5] and run["weights"] is None
    records.write_json(tmp_path / "run.json", {"status": "ok"})
    (tmp_path / "metrics.csv").write_text(HEADER + "1,x,0.1\n")
    with pytest.raises(records.RecordError, match=r"metrics.csv:2: column 'loss'"):
        records.read_setup_run(tmp_path)
    assert records.read_setup_run(tmp_path, lenient=True)["metrics"] is None
