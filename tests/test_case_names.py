"""A case name or a path, everywhere (issue 24, item 3): every subcommand that takes a case resolves a bare name
against the configured cases folder with one rule (parity.case.names); a miss names the closest cases.
The misses as bad input (exit 2, one line, nothing written) are rows of tests/test_bad_input.py."""

from pathlib import Path

import pytest

from parity import cli
from parity.case.names import CaseNotFound, case_name_arg, resolve_case_arg
from parity.core.errors import InputError
from parity.options import UPDATE_MODES

from test_localize import control
from test_report import run_dir  # noqa: F401  (the fixture)


@pytest.fixture
def cases(tmp_path, monkeypatch):
    """tmp_path/cases with three case files (contents are not read here); the working directory is tmp_path."""
    folder = tmp_path / "cases"
    folder.mkdir()
    for name in ("replicate_vs_hsdp", "titan_replicate_vs_hsdp", "ddp_vs_replicate"):
        (folder / f"{name}.toml").write_text("")
    monkeypatch.chdir(tmp_path)
    return folder


def test_a_name_means_the_case_file_in_the_cases_folder(cases):
    assert resolve_case_arg("replicate_vs_hsdp", cases) == cases / "replicate_vs_hsdp.toml"
    assert resolve_case_arg("replicate_vs_hsdp.toml", cases) == cases / "replicate_vs_hsdp.toml"
    assert resolve_case_arg("cases/ddp_vs_replicate.toml", cases) == Path("cases/ddp_vs_replicate.toml")
    assert resolve_case_arg("cases", cases) == Path("cases")  # a folder of case files


def test_an_existing_path_wins_over_a_name(cases):
    (cases.parent / "replicate_vs_hsdp").mkdir()  # a folder in the working directory spelt like a case name
    assert resolve_case_arg("replicate_vs_hsdp", cases) == Path("replicate_vs_hsdp")


def test_a_misspelt_name_suggests_the_closest_best_first(cases):
    with pytest.raises(CaseNotFound) as e:
        resolve_case_arg("replicat_vs_hsdp", cases)
    assert str(e.value) == (f"replicat_vs_hsdp: no such case: not a path, and no {cases}/replicat_vs_hsdp.toml; "
                            "did you mean: replicate_vs_hsdp, titan_replicate_vs_hsdp?")
    assert isinstance(e.value, InputError)  # exit 2


def test_a_miss_with_nothing_close_names_the_folder_searched(cases, tmp_path):
    with pytest.raises(CaseNotFound, match=rf"^zzz: no such case: not a path, and no {cases}/zzz.toml; "
                                           rf"searched {cases} \(3 case file\(s\), none close\)$"):
        resolve_case_arg("zzz", cases)
    with pytest.raises(CaseNotFound, match=r"the cases folder .*nowhere does not exist$"):
        resolve_case_arg("replicate_vs_hsdp", tmp_path / "nowhere")
    with pytest.raises(CaseNotFound, match=r"^nowhere: no such case file or folder; .*nowhere \(which does not exist\)$"):
        resolve_case_arg("nowhere", Path("nowhere"))  # `parity run` with no argument and no cases folder
    with pytest.raises(CaseNotFound, match=r"^cases/replicat_vs_hsdp.toml: no such case file or folder; "
                                           r"did you mean: cases/replicate_vs_hsdp.toml, "):
        resolve_case_arg("cases/replicat_vs_hsdp.toml", cases)


def test_a_case_files_path_gives_its_name_where_a_run_directory_is_searched():
    assert case_name_arg("cases/control_scale_grad.toml", "--case") == "control_scale_grad"
    assert case_name_arg("control_scale_grad", "--case") == "control_scale_grad"
    with pytest.raises(InputError, match=r"^--case: 'cases/' is not a valid name; .* or a case file's path"):
        case_name_arg("cases/", "--case")


def test_a_bare_update_flag_before_a_case_name_takes_its_default(cases):
    argv = ["run", "--update-baselines", "replicate_vs_hsdp"]
    assert cli.bare_flag_default(argv, "--update-baselines", UPDATE_MODES, "failing", cases) == [
        "run", "--update-baselines=failing", "replicate_vs_hsdp"]
    # A word that names no case stays the flag's value, for argparse to refuse against the flag.
    assert cli.bare_flag_default(["run", "--update-baselines", "replicat_vs_hsdp"], "--update-baselines",
                                 UPDATE_MODES, "failing", cases)[1] == "--update-baselines"


def test_run_and_compare_take_a_name_from_the_configured_cases_folder(tmp_path, write_case, monkeypatch, capsys):
    """[tool.parity] cases points elsewhere than `cases`; `run NAME` reaches the runner with that case file."""
    case, out = control(tmp_path, write_case, '{ step = 2, phase = "forward", name = "layers.1.feed_forward" }')
    project = tmp_path / "project"
    (project / "suite").mkdir(parents=True)
    (project / "pyproject.toml").write_text('[tool.parity]\ncases = "suite"\n')
    case.path.rename(project / "suite" / "ctl.toml")
    monkeypatch.chdir(project)
    ran = []
    monkeypatch.setattr(cli, "_run_here", lambda args, cases, devices, leader=None: ran.append(cases) or 0)
    assert cli.main(["run", "ctl", "--device", "cpu", "--out", str(tmp_path / "out")]) == 0
    assert [(c.name, c.path) for c in ran[0]] == [("ctl", project / "suite" / "ctl.toml")]
    # After a bare --update-baselines, a case name is the case, not the flag's value.
    assert cli.main(["run", "--update-baselines", "ctl", "--device", "cpu", "--out", str(tmp_path / "out"),
                     "--baselines", str(tmp_path / "bl")]) == 0
    assert ran[1][0].name == "ctl" and ran[1][0].path == project / "suite" / "ctl.toml"
    capsys.readouterr()
    # Judged (exit 1: no baselines stored), not refused as bad input (exit 2).
    assert cli.main(["compare", str(out), "ctl", "--baselines", str(tmp_path / "bl")]) == 1
    assert capsys.readouterr().out.startswith("ctl: FAIL on cpu/gloo")


def test_locate_takes_a_name_or_a_path(tmp_path, write_case, monkeypatch, capsys):
    case, out = control(tmp_path, write_case, '{ step = 2, phase = "forward", name = "layers.1.feed_forward" }')
    (tmp_path / "cases").mkdir()
    case.path.rename(tmp_path / "cases" / "ctl.toml")
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    assert cli.main(["locate", str(out), "cases/ctl.toml"]) == 0
    by_path = capsys.readouterr().out
    assert cli.main(["locate", str(out), "ctl"]) == 0
    assert capsys.readouterr().out == by_path and "first not bitwise: step 2, forward" in by_path


def test_evidence_case_takes_a_name_or_a_case_files_path(run_dir, capsys):  # noqa: F811
    assert cli.main(["evidence", str(run_dir), "--case", "tol_tp"]) == 0
    by_name = capsys.readouterr().out
    assert cli.main(["evidence", str(run_dir), "--case", "cases/tol_tp.toml"]) == 0  # no such file here: its stem
    assert capsys.readouterr().out == by_name and "tol_tp" in by_name
