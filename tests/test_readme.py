"""README.md and docs/*.md, as a newcomer reads them: every `parity ...` and `pytest ...` command shown in a
```sh block parses with the real argument parser, and every relative link leads to a file (and heading) here.

A synopsis line (`parity run [CASES] [--device auto|cpu|cuda]`) is read with every optional part given: its
brackets are dropped, each `a|b|c` choice yields one command per alternative, and a placeholder in capitals
(CASES, RUN_DIR, N) stands for a sample value.
"""

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from parity import cli

REPO = Path(__file__).resolve().parent.parent
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
FENCE = re.compile(r"^[ \t]*```(\w*)[ \t]*\n(.*?)^[ \t]*```", re.S | re.M)
# Placeholders that an option reads as a number; any other placeholder reads as a word.
NUMBERS = {"N": "2", "R": "0", "S": "60"}
PLACEHOLDER = re.compile(r"[A-Z][A-Z0-9_]*(:[A-Z0-9_]+)?(\.\.\.)?")


def sh_lines(page: Path) -> list[str]:
    """The lines of the page's ```sh blocks, comments dropped, empty lines left out."""
    lines = []
    for lang, body in FENCE.findall(page.read_text()):
        if lang in ("sh", "bash", "shell"):
            lines += [line.split(" #")[0].strip() for line in body.splitlines()
                      if line.split(" #")[0].strip() and not line.strip().startswith("#")]
    return lines


def commands(line: str) -> list[list[str]]:
    """The `parity` and `pytest` commands of one shell line (split at `&&`, redirections dropped), each as argv
    with any path before the program's name stripped (`.venv/bin/parity` is `parity`)."""
    found, current, redirected = [], [], False
    for word in [*shlex.split(line), "&&"]:
        if word == "&&":
            if current and Path(current[0]).name in ("parity", "pytest"):
                found.append([Path(current[0]).name, *current[1:]])
            current = []
        elif not redirected and word != ">":
            current.append(word)
        redirected = word == ">"
    return found


def variants(argv: list[str]) -> list[list[str]]:
    """A synopsis as concrete commands: brackets dropped, one command per alternative of its longest
    `a|b|c` choice (the others take their first), placeholders replaced by sample values."""
    words = [_unbracketed(w) for w in argv]
    words = [w for w in words if w]
    choices = [_alternatives(w) for w in words]
    count = max((len(c) for c in choices), default=1)
    return [[_sample(c[min(i, len(c) - 1)]) for c in choices] for i in range(count)]


def _unbracketed(word: str) -> str:
    """A synopsis word without its optional-part brackets: `[--out`, `DIR]`, `[--update-baselines[=new|all]]`;
    a word with brackets of its own (the node id `test_case[NAME]`) stays whole."""
    if word.startswith("[") or (word.endswith("]") and "[" not in word):
        return word.replace("[", "").replace("]", "")
    return word


def _alternatives(word: str) -> list[str]:
    """`--flag=a|b` as ['--flag=a', '--flag=b']; `a|b` as ['a', 'b']; anything else as itself."""
    prefix, eq, value = word.partition("=") if word.startswith("-") and "=" in word else ("", "", word)
    return [prefix + eq + alt for alt in value.split("|")]


def _sample(word: str) -> str:
    """A placeholder (CASE..., RUN_DIR, HOST:PORT) replaced by a sample value; any other word as it is."""
    if PLACEHOLDER.fullmatch(word):
        return NUMBERS.get(word, "x")
    return word


def shown(program: str) -> list[tuple[str, list[str]]]:
    """(page and line, argv after the program's name) of every `program` command the pages show."""
    return [(f"{page.relative_to(REPO)}: {line}", argv[1:]) for page in PAGES for line in sh_lines(page)
            for argv in commands(line) if argv[0] == program]


def test_the_pages_show_commands():
    assert len(shown("parity")) >= 10 and len(shown("pytest")) >= 4


@pytest.mark.parametrize("where, argv", shown("parity"), ids=[w for w, _ in shown("parity")])
def test_every_parity_command_shown_parses(where, argv, capsys):
    for concrete in variants(argv):
        words = cli.bare_flag_default(concrete, "--update-baselines", cli.UPDATE_MODES, "failing")
        try:
            args = cli.parser().parse_args(words)
        except SystemExit:
            pytest.fail(f"{where}\n`parity {shlex.join(concrete)}` does not parse: {capsys.readouterr().err}")
        assert args.fn is not None


def test_every_pytest_command_shown_parses(tmp_path):
    """Each pytest command, with --help added, in an empty folder: pytest's own parser (with parity's options)
    accepts its options and their values, or exits with a usage error."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    failures = []
    for where, argv in shown("pytest"):
        for concrete in variants(argv):
            done = subprocess.run([sys.executable, "-m", "pytest", *concrete, "-p", "no:cacheprovider", "--help"],
                                  cwd=tmp_path, capture_output=True, text=True, env=env, timeout=120)
            if done.returncode != 0:
                failures.append(f"{where}: `pytest {shlex.join(concrete)}`: {done.stderr.strip()[-500:]}")
    assert not failures, "\n".join(failures)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped (not '-' or '_'), spaces as '-'."""
    text = re.sub(r"[`*]", "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def prose(page: Path) -> str:
    """The page without its fenced code blocks and inline code, where a link is not a link."""
    return re.sub(r"`[^`\n]*`", "", FENCE.sub("", page.read_text()))


def anchors(page: Path) -> set[str]:
    return {slug(h) for h in re.findall(r"^#{1,6} +(.+?) *#*$", FENCE.sub("", page.read_text()), re.M)}


def links() -> list[tuple[Path, str]]:
    """Every relative Markdown link target of the pages: (page, target)."""
    found = []
    for page in PAGES:
        for target in re.findall(r"\]\(([^)\s]+)(?: \"[^\"]*\")?\)", prose(page)):
            if not re.match(r"[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto: lead elsewhere
                found.append((page, target))
    return found


def test_the_pages_have_links():
    assert len(links()) >= 10


@pytest.mark.parametrize("page, target", links(), ids=[f"{p.relative_to(REPO)}->{t}" for p, t in links()])
def test_every_relative_link_resolves(page, target):
    path, _, anchor = target.partition("#")
    file = (page.parent / path).resolve() if path else page
    assert file.exists(), f"{page.relative_to(REPO)}: link {target}: {file} does not exist"
    assert file.is_relative_to(REPO), f"{page.relative_to(REPO)}: link {target} leads out of the repository"
    if anchor and file.suffix == ".md":
        assert anchor in anchors(file), (f"{page.relative_to(REPO)}: link {target}: no heading #{anchor} in "
                                         f"{file.relative_to(REPO)}; headings: {sorted(anchors(file))}")


def test_ci_runs_the_readme_test_command_verbatim():
    """.ci/run's command is README's command (b), character for character: the README's promise is what CI checks."""
    readme = (REPO / "README.md").read_text()
    block = re.search(r"^\(b\).*?```sh\n(.*?)\n```", readme, flags=re.S | re.M)
    assert block, "README.md has no (b) command block"
    ci = (REPO / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert ci == block.group(1).strip()
