"""Shared test fixtures: the project root on sys.path and the official golden fixtures."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

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
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def torchrun_main(tmp_path):
    """Runs main.py under `torchrun --nproc_per_node=2` (gloo on CPU); returns each rank's final model and EMA
    weights, and the run's stdout."""
    def run(argv):
        script = tmp_path / "torchrun_rank.py"
        script.write_text(
            "import os, sys, torch\n"
            f"sys.path.insert(0, {str(ROOT)!r})\n"
            "import main\n"
            "result = main.main(main.get_args_parser().parse_args(sys.argv[1:]))\n"
            "state = {'model': result['model'].state_dict(), 'ema': result['model_ema'].module.state_dict()}\n"
            f"torch.save(state, os.path.join({str(tmp_path)!r}, 'torchrun%s.pt' % os.environ['RANK']))\n")
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script),
                   *argv]
        done = subprocess.run(command, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True,
                              timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        return [torch.load(tmp_path / f"torchrun{rank}.pt") for rank in (0, 1)], done.stdout
    return run
