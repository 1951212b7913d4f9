"""The example CI workflow runs the command the docs give and keeps the report when cases fail.

PyYAML is not a dependency, so the workflow is read as text: its steps are the `- ` entries under
`steps:` (the file keeps one step per entry, keys indented below it).
"""

import os
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from test_config import CASE as TINY_CASE  # two identical single-process setups, the smallest case

from parity.core.reproduce import PYTEST

REPO = Path(__file__).resolve().parent.parent
WORKFLOW = REPO / "examples" / "github-actions-8gpu.yml"


def doc_page(name: str) -> str:
    return (REPO / "docs" / name).read_text()


def code_blocks(text: str, lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", text, re.S)


def steps(text: str) -> list[str]:
    body = text.split("    steps:\n", 1)[1]
    return [s for s in re.split(r"^      - ", body, flags=re.M) if s.strip()]


def step_value(step: str, key: str) -> str | None:
    """The value of `key` in the step, at any depth (`path` sits under `with:`); comments dropped."""
    m = re.search(rf"^\s*{key}: (.*)$", step, re.M)
    return m.group(1).split(" #")[0].strip() if m else None


def test_workflow_runs_readme_command_uploads_configured_out_always_and_fails_on_a_failed_verdict():
    section = doc_page("own-repository.md")
    documented = [line.split("#")[0].strip() for block in code_blocks(section, "sh") for line in block.splitlines()
                  if line.startswith(shlex.join(PYTEST)) and "-m 8gpu" in line]
    assert len(documented) == 1, documented
    out = tomllib.loads(code_blocks(section, "toml")[0])["tool"]["parity"]["out"]
    assert f"uploads `{out}`" in section  # the docs say what the example uploads

    text = WORKFLOW.read_text()
    assert "continue-on-error" not in text  # a failed verdict must fail the job
    found = steps(text)
    names = [step_value(s, "name") for s in found]
    assert names[0] == "Check out" and step_value(found[0], "uses").startswith("actions/checkout@")
    install = found[names.index("Install")]
    assert re.search(r"pip install torch==\d+\.\d+\.\d+ --index-url https://download\.pytorch\.org/whl/cu\d+", install)
    assert re.search(r'pip install "parity @ git\+https://', install)

    runs = [i for i, s in enumerate(found) if (step_value(s, "run") or "").startswith("pytest ")]
    assert len(runs) == 1
    run = shlex.split(step_value(found[runs[0]], "run"))
    assert run[:len(shlex.split(documented[0]))] == shlex.split(documented[0])

    upload = next(i for i, s in enumerate(found) if (step_value(s, "uses") or "").startswith("actions/upload-artifact@"))
    assert upload > runs[0] and step_value(found[upload], "if") == "always()"
    assert step_value(found[upload], "path") == out


def first_run_commands() -> list[str]:
    """The first-run block of docs/own-repository.md: the one ```sh block that updates baselines, comments dropped."""
    blocks = [b for b in code_blocks(doc_page("own-repository.md"), "sh") if "update-baselines=new" in b]
    assert len(blocks) == 1, blocks
    return [line.split("#")[0].strip() for line in blocks[0].splitlines() if line.split("#")[0].strip()]


@pytest.mark.slow
def test_own_repository_recipe_passes_as_copied_into_an_empty_folder(tmp_path, seed_cache):
    """[tool.parity] as written, a tiny case in its cases folder and no baselines folder: the documented first
    run (pytest's, then the CLI's in the comment) creates the baselines and passes; a later run passes on them."""
    table = code_blocks(doc_page("own-repository.md"), "toml")[0]
    settings = tomllib.loads(table)["tool"]["parity"]
    env = dict(os.environ, PARITY_CACHE=str(seed_cache), PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    first = first_run_commands()
    pytest_first = first[0]
    cli_first = doc_page("own-repository.md").split(pytest_first, 1)[1].split("# or: ", 1)[1].split("\n")[0].strip()
    assert cli_first == "parity run --update-baselines=new"
    for name, command in (("by-pytest", pytest_first), ("by-cli", cli_first)):
        repo = tmp_path / name
        (repo / settings["cases"]).mkdir(parents=True)
        subprocess.run(["git", "init", "-q", str(repo)], check=True)  # the block ends with `git add`
        (repo / "pyproject.toml").write_text(table)
        (repo / settings["cases"] / "tiny.toml").write_text(TINY_CASE)
        for line in [command, *first[1:]] if name == "by-pytest" else [command]:
            done = subprocess.run(shlex.split(line), cwd=repo, capture_output=True, text=True, env=env, timeout=600)
            assert done.returncode == 0, f"{line}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        stored = repo / settings["baselines"] / "tiny"
        assert sorted(p.name.split(".")[0] for p in stored.glob("*.csv")) == ["a", "b"], name
    again = subprocess.run(["parity", "run"], cwd=tmp_path / "by-cli", capture_output=True, text=True, env=env,
                           timeout=600)
    assert again.returncode == 0 and "matches" in again.stdout, again.stdout[-3000:] + again.stderr[-3000:]
