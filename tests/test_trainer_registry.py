"""A trainer is one class and one registry entry: a toy trainer registered here runs a real case through
`parity run`, and the loader knows every registered trainer by name (and no other)."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from parity import cli
from parity.trainers import TRAINERS
from parity.trainers.command import CommandTrainer

# One JSON line per step; no braces, which argv templates read as placeholders.
TOY_SCRIPT = ("import json, pathlib, sys; out, steps, scale = pathlib.Path(sys.argv[1]), int(sys.argv[2]), "
              "float(sys.argv[3]); out.joinpath('metrics.jsonl').write_text(''.join(json.dumps(dict(step=s, "
              "loss=scale / s, grad_norm=0.5)) + chr(10) for s in range(1, steps + 1)))")


class ToyTrainer(CommandTrainer):
    """`trainer = "toy"`: a loss of loss_scale / step, written by a short Python command."""

    name = "toy"
    keys = frozenset({"loss_scale"})
    marker = "case runs the toy trainer"

    def setup_problems(self, body: dict, case_dir: Path) -> list[tuple[str, str]]:
        scale = body.get("loss_scale", 1.0)
        ok = isinstance(scale, (int, float)) and not isinstance(scale, bool) and scale > 0
        return [] if ok else [("loss_scale", f"{scale!r} is not allowed; allowed: a number > 0")]

    def normalize(self, body: dict, case_dir: Path) -> dict:
        return {"argv": ["{python}", "-c", TOY_SCRIPT, "{output_dir}", "{steps}", repr(body.get("loss_scale", 1.0))],
                "metrics": {"reader": "jsonl", "path": "metrics.jsonl"}, "weights": None,
                "cwd": str(case_dir.resolve()), "env": {}}


@pytest.fixture
def toy(monkeypatch, seed_cache):
    monkeypatch.setitem(TRAINERS, ToyTrainer.name, ToyTrainer())  # the one registry line, for this test only
    monkeypatch.setenv("PARITY_CACHE", str(seed_cache))


def write(tmp_path: Path, setups: str, expect: str = "") -> Path:
    path = tmp_path / "cases" / "toy_pair.toml"
    path.parent.mkdir(exist_ok=True)
    path.write_text(textwrap.dedent("""\
        description = "two toy setups train alike"
        [train]
        model = "tiny"
        steps = 3
        """) + expect + textwrap.dedent(setups))
    return path


def toy_pair(loss_scale: float) -> str:
    """Two toy setups, the second with its own loss_scale."""
    return f"""
        [setups.a]
        trainer = "toy"
        world_size = 1
        [setups.b]
        trainer = "toy"
        world_size = 1
        loss_scale = {loss_scale}
        """


def run(tmp_path: Path, case: Path) -> int:
    return cli.main(["run", str(case), "--out", str(tmp_path / "out"), "--baselines", str(tmp_path / "baselines"),
                     "--update-baselines=new", "--device", "cpu", "--no-report"])


def test_a_registered_toy_trainer_runs_a_case_and_is_judged(tmp_path, toy):
    case = write(tmp_path, toy_pair(loss_scale=1))
    assert run(tmp_path, case) == 0
    verdict = json.loads((tmp_path / "out" / "toy_pair" / "verdict.json").read_text())
    assert verdict["passed"] and [p["other"] for p in verdict["pairs"]] == ["b"]
    run_json = json.loads((tmp_path / "out" / "toy_pair" / "b" / "run.json").read_text())
    assert run_json["trainer"] == "toy" and run_json["status"] == "ok"
    assert "trainer: toy" in (tmp_path / "baselines" / "toy_pair" / "a.cpu.csv").read_text()


def test_a_toy_setup_that_trains_otherwise_is_caught(tmp_path, toy):
    case = write(tmp_path, toy_pair(loss_scale=2), expect='[expect]\noutcome = "diverge"\nfirst_divergence = { metric = "loss", step = 1, ratio = 2 }\n')
    assert run(tmp_path, case) == 0
    verdict = json.loads((tmp_path / "out" / "toy_pair" / "verdict.json").read_text())
    assert verdict["passed"]


def test_the_toy_trainers_own_keys_are_checked_in_one_line(tmp_path, toy, capsys):
    case = write(tmp_path, '[setups.a]\ntrainer = "toy"\nworld_size = 1\n[setups.b]\ntrainer = "toy"\n'
                           'world_size = 1\nloss_scale = "big"\n')
    assert cli.main(["list", str(case)]) == 2
    assert capsys.readouterr().err.strip() == (f"parity: error: {case}: setups.b.loss_scale: 'big' is not allowed; "
                                               "allowed: a number > 0")


@pytest.mark.parametrize("registered, allowed", [(False, "builtin, torchtitan, command"),
                                                 (True, "builtin, torchtitan, command, toy")])
def test_an_unknown_trainer_is_one_line_naming_file_and_key(tmp_path, monkeypatch, capsys, registered, allowed):
    if registered:
        monkeypatch.setitem(TRAINERS, ToyTrainer.name, ToyTrainer())
    case = write(tmp_path, '[setups.a]\ndp_api = "none"\n[setups.b]\ntrainer = "nope"\nworld_size = 1\n')
    assert cli.main(["list", str(case)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.strip() == f"parity: error: {case}: setups.b.trainer: 'nope' is not allowed; allowed: {allowed}"
