"""Where a project keeps its cases, baselines and reports, and which device it runs on.

parity is installed into other repositories, which keep their own case files and baselines. They
say where in their pyproject.toml:

    [tool.parity]
    cases = "parity/cases"          # paths relative to that pyproject.toml's folder
    baselines = "parity/baselines"
    out = "reports/parity"
    device = "auto"                 # auto | cpu | cuda

A missing `baselines` folder is bad input, except where the run may write a missing baseline (an
`--update-baselines` / `--parity-update-baselines` mode other than drift): a first run in a new repository then
creates it with the first baseline it writes (and not at all where the case fails).

pytest users may set the same as ini keys (`parity_cases`, `parity_baselines`, `parity_out`,
`parity_device`) in pytest.ini, tox.ini, setup.cfg or `[tool.pytest.ini_options]`, relative to
that file's folder. Precedence, highest first: the command line, pytest's ini keys, `[tool.parity]`,
the front end's own defaults. This module is the one reader and the one validation of all of it;
the CLI and the pytest plugin only say where to start looking and what their defaults are.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, fields
from pathlib import Path

from parity.core import files
from parity.core.errors import InputError

DEVICES = ("auto", "cpu", "cuda")
KEYS = ("cases", "baselines", "out", "device")
# `out` is created by the run; the others are read, so a typo in them must not pass as "no cases".
MUST_EXIST = ("cases", "baselines")
# ...except where the run may write baselines: then the first baseline written creates the folder.
CREATED_WHEN_UPDATING = ("baselines",)
INI_PREFIX = "parity_"


class ConfigError(InputError):
    """A bad [tool.parity] table or parity ini key: one line naming the file and the key."""


@dataclass(frozen=True)
class Settings:
    """Each value is None where this source does not set it."""

    cases: Path | None = None
    baselines: Path | None = None
    out: Path | None = None
    device: str | None = None


def layered(*sources: Settings) -> Settings:
    """Each setting from the first source (highest precedence first) that sets it."""
    return Settings(**{f.name: next((getattr(s, f.name) for s in sources if getattr(s, f.name) is not None), None)
                       for f in fields(Settings)})


def project_settings(start: Path, updating: bool = False) -> Settings:
    """The `[tool.parity]` table of the nearest pyproject.toml at or above `start` that has one
    (pytest likewise skips a pyproject.toml without its own table); empty Settings if none does.
    `updating`: whether the run may write a missing baseline (an update mode but drift); then a missing
    baselines folder is accepted: the first baseline written creates it."""
    for folder in (start, *start.parents):
        path = folder / "pyproject.toml"
        if not path.exists():  # one that exists but is no regular file (a FIFO) is read, and refused, not skipped
            continue
        tool = _read_toml(path).get("tool", {})
        if isinstance(tool, dict) and "parity" in tool:
            table = tool["parity"]
            if not isinstance(table, dict):
                raise ConfigError(f"{path}: tool.parity: {table!r} is not a table; allowed: a [tool.parity] table "
                                  f"with keys {', '.join(KEYS)}")
            unknown = sorted(set(table) - set(KEYS))
            if unknown:
                raise ConfigError(f"{path}: tool.parity.{unknown[0]}: unknown key; allowed: {', '.join(KEYS)}")
            return _settings(table, f"{path}: tool.parity.", path.parent, updating)
    return Settings()


def ini_settings(getini, inifile: Path | None, rootdir: Path, updating: bool = False) -> Settings:
    """pytest's parity ini keys (`getini` is pytest's config.getini; unset keys read as None);
    `updating` as for project_settings."""
    table = {key: getini(INI_PREFIX + key) for key in KEYS}
    # Without an ini file the keys can only come from `-o parity_cases=...`: relative to the rootdir.
    where = f"{inifile}: " if inifile else "-o "
    return _settings({k: v for k, v in table.items() if v is not None}, where + INI_PREFIX,
                     inifile.parent if inifile else rootdir, updating)


def _settings(table: dict, prefix: str, base: Path, updating: bool) -> Settings:
    """Validated settings from `table`; `prefix` names the file and table for the message."""
    found = {}
    for key, value in table.items():
        where = f"{prefix}{key}"
        if key == "device":
            if value not in DEVICES:
                raise ConfigError(f"{where}: {value!r} is not allowed; allowed: {', '.join(DEVICES)}")
            found[key] = value
            continue
        if not isinstance(value, str) or not value.strip():
            raise ConfigError(f"{where}: {value!r} is not allowed; allowed: a path (a non-empty string), "
                              f"relative to {base}")
        folder = base / value
        if key in MUST_EXIST and not folder.is_dir() and not _may_create(key, folder, updating):
            raise ConfigError(f"{where}: {value!r}: {folder} is not a directory; allowed: an existing directory, "
                              f"relative to {base}")
        found[key] = folder
    return Settings(**found)


def _may_create(key: str, folder: Path, updating: bool) -> bool:
    """Whether a missing `key` folder is left for the run to create: the baselines folder, under an update mode
    (a path that exists as anything but a folder never is)."""
    return updating and key in CREATED_WHEN_UPDATING and not folder.exists() and not folder.is_symlink()


def _read_toml(path: Path) -> dict:
    try:
        return tomllib.loads(files.read_text(path))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not valid TOML ({e}); allowed: a TOML file") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read it ({e.strerror})") from None
