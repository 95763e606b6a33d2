"""Fixtures of the fault-injection suite and the figures line it prints at the end of a pytest run."""
from pathlib import Path

import pytest

from faults.faultkit import Zygote

ROOT = Path(__file__).resolve().parents[2]
FIGURES = {"kills": 0, "recovered": 0, "inputs": 0, "clear": 0, "loads": 0, "executions": 0}


@pytest.fixture(scope="session")
def zygote():
    """One pre-imported process that forks the runs of the training scripts (faultkit.Zygote)."""
    process = Zygote(ROOT)
    yield process
    process.close()


@pytest.fixture(scope="session")
def figures():
    """The counts behind the summary line; tests add to them as they go."""
    return FIGURES


def pytest_terminal_summary(terminalreporter):
    if FIGURES["kills"] or FIGURES["inputs"] or FIGURES["loads"]:
        terminalreporter.write_line(
            f"faults: {FIGURES['recovered']}/{FIGURES['kills']} kills recovered, {FIGURES['clear']}/"
            f"{FIGURES['inputs']} bad inputs clear, {FIGURES['executions']} code executions "
            f"(in {FIGURES['loads']} loads of crafted checkpoints)")
