import textwrap
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def seed_cache(tmp_path_factory) -> Path:
    """One seed-checkpoint cache for the whole test session, away from the user's cache."""
    return tmp_path_factory.mktemp("seed-cache")


@pytest.fixture
def write_case(tmp_path):
    """Write a case file from TOML text; returns its path (the file stem is the case name)."""

    def write(text: str, name: str = "case") -> Path:
        path = tmp_path / f"{name}.toml"
        path.write_text(textwrap.dedent(text))
        return path

    return write
