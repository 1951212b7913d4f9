"""[tool.parity] and the parity_* ini keys: where they are found, what wins, and one line for each mistake."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from parity.cli import DEFAULTS, parser
from parity.config import ConfigError, Settings, ini_settings, layered, project_settings

CASE = """
description = "two identical single-process setups"
[train]
model = "tiny"
steps = 2
global_batch = 4
seq_len = 16
[setups.a]
dp_api = "none"
[setups.b]
dp_api = "none"
"""


def project(root: Path, table: str, cases=("from_pyproject",)) -> Path:
    """A user's repository: pyproject.toml with `table` under [tool.parity], case folders and a baseline root."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "pyproject.toml").write_text(f'[project]\nname = "user"\n[tool.parity]\n{textwrap.dedent(table)}')
    for name in cases:  # not in <rootdir>/cases, where parity would look without the table
        (root / "suite").mkdir(exist_ok=True)
        (root / "suite" / f"{name}.toml").write_text(CASE)
    (root / "baselines").mkdir(exist_ok=True)
    return root


def run(args, cwd):
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, env=dict(os.environ), timeout=300)


def test_nearest_pyproject_with_a_parity_table_wins_and_paths_are_relative_to_it(tmp_path):
    repo = project(tmp_path / "repo", 'cases = "suite"\nbaselines = "baselines"\nout = "reports/p"\ndevice = "cpu"\n')
    inner = repo / "pkg" / "sub"
    inner.mkdir(parents=True)
    (repo / "pkg" / "pyproject.toml").write_text('[project]\nname = "inner"\n')  # no [tool.parity]: passed by
    assert project_settings(inner) == Settings(repo / "suite", repo / "baselines", repo / "reports" / "p", "cpu")
    assert project_settings(tmp_path) == Settings()


def test_precedence_first_source_that_sets_a_value():
    given = Settings(cases=Path("cli"))
    ini = Settings(cases=Path("ini"), out=Path("ini-out"))
    table = Settings(cases=Path("pyproject"), out=Path("pyproject-out"), device="cuda")
    assert layered(given, ini, table, DEFAULTS) == Settings(Path("cli"), DEFAULTS.baselines, Path("ini-out"), "cuda")


def test_ini_keys_are_relative_to_the_ini_file(tmp_path):
    (tmp_path / "mine").mkdir()
    values = {"parity_cases": "mine", "parity_device": "cpu"}
    got = ini_settings(values.get, tmp_path / "pytest.ini", Path("/nowhere"))
    assert got == Settings(cases=tmp_path / "mine", device="cpu")
    with pytest.raises(ConfigError, match=r"pytest.ini: parity_baselines: 'gone': .* is not a directory"):
        ini_settings({"parity_baselines": "gone"}.get, tmp_path / "pytest.ini", tmp_path)


@pytest.mark.parametrize("table, message", [
    ('case = "cases"\n', "tool.parity.case: unknown key; allowed: cases, baselines, out, device"),
    ("cases = 3\n", "tool.parity.cases: 3 is not allowed; allowed: a path (a non-empty string)"),
    ('device = "gpu"\n', "tool.parity.device: 'gpu' is not allowed; allowed: auto, cpu, cuda"),
    ('baselines = "missing"\n', "tool.parity.baselines: 'missing': "),
    ("parity = 1\n[tool]\nparity = 2\n", "not valid TOML"),
])
def test_bad_table_is_one_line_naming_file_and_key(tmp_path, table, message):
    repo = project(tmp_path, table)
    with pytest.raises(ConfigError) as e:
        project_settings(repo)
    assert str(e.value).startswith(f"{repo / 'pyproject.toml'}: ") and message in str(e.value)


def test_cli_defaults_come_from_the_table_found_from_the_current_directory(tmp_path):
    repo = project(tmp_path, 'cases = "suite"\nout = "reports/p"\ndevice = "cpu"\n')
    args = parser(layered(project_settings(repo), DEFAULTS)).parse_args(["run"])
    assert (args.cases, args.out, args.device, args.baselines) == ([str(repo / "suite")], str(repo / "reports/p"),
                                                                  "cpu", "baselines")
    listed = run([sys.executable, "-m", "parity.cli", "list"], repo / "suite")  # from a subfolder: found above
    assert listed.returncode == 0, listed.stderr
    assert [line.split()[0] for line in listed.stdout.splitlines()[1:]] == ["from_pyproject"]


def test_cli_bad_table_exits_2_with_one_line(tmp_path):
    repo = project(tmp_path, 'device = "gpu"\n')
    r = run([sys.executable, "-m", "parity.cli", "run"], repo)
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert f"{repo / 'pyproject.toml'}: tool.parity.device: 'gpu' is not allowed" in r.stderr


def test_pytest_pyargs_reads_the_table_ini_keys_win_and_the_command_line_wins_over_both(tmp_path):
    repo = project(tmp_path, 'cases = "suite"\n')
    (repo / "ini_cases").mkdir()
    (repo / "ini_cases" / "from_ini.toml").write_text(CASE)
    (repo / "cli_cases").mkdir()
    (repo / "cli_cases" / "from_cli.toml").write_text(CASE)
    collect = [sys.executable, "-m", "pytest", "--pyargs", "parity", "--collect-only", "-q", "-p", "no:cacheprovider"]

    def collected(*extra) -> list[str]:
        r = run([*collect, *extra], repo)
        assert r.returncode == 0, r.stdout + r.stderr
        return [line.rpartition("[")[2].rstrip("]") for line in r.stdout.splitlines() if "::test_case[" in line]

    assert collected() == ["from_pyproject"]
    (repo / "pytest.ini").write_text("[pytest]\nparity_cases = ini_cases\n")
    assert collected() == ["from_ini"]
    assert collected("--parity-cases=cli_cases") == ["from_cli"]


def test_pytest_bad_table_is_a_usage_error(tmp_path):
    repo = project(tmp_path, 'cases = "nope"\n')
    r = run([sys.executable, "-m", "pytest", "--pyargs", "parity", "-p", "no:cacheprovider"], repo)
    assert r.returncode == 4, r.stdout + r.stderr
    assert f"{repo / 'pyproject.toml'}: tool.parity.cases: 'nope': " in r.stderr


def test_a_missing_baselines_folder_is_bad_input_unless_an_update_mode_will_create_it(tmp_path):
    """Without an update mode: the one-line error, from either front end, nothing made. With one: accepted by
    the settings, and still not made while another input is bad (here a case file)."""
    repo = project(tmp_path, 'cases = "suite"\nbaselines = "tests/bl"\n')
    (repo / "baselines").rmdir()
    message = f"{repo / 'pyproject.toml'}: tool.parity.baselines: 'tests/bl': {repo / 'tests' / 'bl'} is not a directory"
    with pytest.raises(ConfigError, match="is not a directory"):
        project_settings(repo)
    assert project_settings(repo, updating=True).baselines == repo / "tests" / "bl"
    cli = run([sys.executable, "-m", "parity.cli", "run"], repo)
    assert cli.returncode == 2 and cli.stderr == f"parity: error: {message}; allowed: an existing directory, relative to {repo}\n"
    plugin = run([sys.executable, "-m", "pytest", "--pyargs", "parity", "-p", "no:cacheprovider"], repo)
    assert plugin.returncode == 4 and message in plugin.stderr, plugin.stdout + plugin.stderr
    # drift mode writes no missing baseline, so nothing would ever make the folder: still bad input
    cli = run([sys.executable, "-m", "parity.cli", "run", "--update-baselines=drift"], repo)
    assert cli.returncode == 2 and message in cli.stderr, cli.stdout + cli.stderr
    plugin = run([sys.executable, "-m", "pytest", "--pyargs", "parity", "-p", "no:cacheprovider",
                  "--parity-update-baselines=drift"], repo)
    assert plugin.returncode == 4 and message in plugin.stderr, plugin.stdout + plugin.stderr
    (repo / "suite" / "broken.toml").write_text("[train]\nsteps = 0\n")
    for argv in ([sys.executable, "-m", "parity.cli", "run", "--update-baselines=new", "--device", "cpu"],
                 [sys.executable, "-m", "pytest", "--pyargs", "parity", "-p", "no:cacheprovider",
                  "--parity-update-baselines=new"]):
        r = run(argv, repo)
        assert r.returncode in (2, 4) and "broken.toml" in r.stdout + r.stderr, r.stdout + r.stderr
        assert not (repo / "tests").exists()
