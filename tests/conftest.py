"""Shared test fixtures: the project root on sys.path and the official golden fixtures."""
import json
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# ../shared sits beside the clone in CI; a user's clone usually has none.
SHARED = Path(os.environ.get("ADVENTURER_SHARED", ROOT.parent / "shared"))
GOLDEN = SHARED / "golden"
SPEC = SHARED / "spec"


def golden_cases(family=None):
    """Names of the golden fixtures (optionally of one family), [] when ../shared is absent."""
    index = GOLDEN / "index.json"
    if not index.exists():
        return []
    cases = json.loads(index.read_text())
    return [c["name"] for c in cases if family is None or c["family"] == family]


@pytest.fixture
def golden():
    """Load a golden fixture by name; skip with a reason when ../shared/golden is absent."""
    import torch

    def load(name):
        path = GOLDEN / f"{name}.pt"
        if not path.exists():
            pytest.skip(f"golden fixture {path} not found (../shared/golden sits beside the clone in CI)")
        return torch.load(path, weights_only=True)

    return load


@pytest.fixture
def keys_table():
    """Rows of ../shared/spec/KEYS_full.tsv as dicts; skip when absent."""
    path = SPEC / "KEYS_full.tsv"
    if not path.exists():
        pytest.skip(f"{path} not found (../shared/spec sits beside the clone in CI)")
    lines = path.read_text().splitlines()
    header = lines[0].split("\t")
    return [dict(zip(header, line.split("\t"))) for line in lines[1:] if line.strip()]


@pytest.fixture
def one_thread():
    """Tiny models run fastest on one thread, and far faster than two on a busy 2-core machine."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
