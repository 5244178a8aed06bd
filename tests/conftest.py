"""Shared fixtures: the repository root and a CLI runner that runs from it."""

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def cli(monkeypatch):
    """Run `cnnspec ARGS...` in-process from the repository root (short relative paths)."""
    from typer.testing import CliRunner

    from cnnspec.cli import app

    monkeypatch.chdir(REPO)
    runner = CliRunner()

    def invoke(*args):
        return runner.invoke(app, [str(a) for a in args])

    return invoke
