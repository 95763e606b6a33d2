"""timm's own tests/test_models.py, run on this project's classifiers (see tests/timm_suite_plugin.py).

The suite is timm's code, so it is never copied here: it comes from the sdist of the INSTALLED timm version,
found in $TIMM_TESTS_DIR (a folder holding test_models.py), else in a cache folder, else fetched once from
PyPI with `pip download` into that cache. Without any of them the test is skipped with the reason.
Not selected: torchscript and FX tracing (not supported), pretrained weights (need the hub) and the
slow prune contract (timm's CI leaves it out too; it passes here when selected).
"""
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path

import pytest
import timm

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
SELECTION = ("(forward or backward or default_cfgs or intermediates) "
             "and not (torchscript or fx or pretrained or prune)")
# Each must pass at least once, or the plugin no longer routes our models into timm's categories.
EXPECTED_TESTS = ("test_model_forward", "test_model_backward", "test_model_default_cfgs_non_std",
                  "test_model_forward_intermediates", "test_model_forward_intermediates_features")


def _cache_dir():
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "adventurer-timm-tests"
    try:
        base.mkdir(parents=True, exist_ok=True)
        return base
    except OSError:  # read-only home: the system temp folder
        base = Path(tempfile.gettempdir()) / "adventurer-timm-tests"
        base.mkdir(parents=True, exist_ok=True)
        return base


def _extract_tests(sdist, prefix, target):
    """Only the sdist's `tests/` files (not its timm/ package, which could shadow the installed one)."""
    with tarfile.open(sdist) as archive:
        for member in archive.getmembers():
            relative = Path(member.name).relative_to(prefix) if member.name.startswith(prefix) else None
            if member.isfile() and relative is not None and ".." not in relative.parts:
                (target / relative).parent.mkdir(parents=True, exist_ok=True)
                (target / relative).write_bytes(archive.extractfile(member).read())


def timm_tests_dir():
    """Folder with timm's test_models.py for the installed timm version, or pytest.skip with the reason."""
    if os.environ.get("TIMM_TESTS_DIR"):
        folder = Path(os.environ["TIMM_TESTS_DIR"])
        if not (folder / "test_models.py").is_file():
            pytest.fail(f"TIMM_TESTS_DIR={folder} holds no test_models.py")
        return folder
    version = timm.__version__
    folder = _cache_dir() / f"timm-{version}" / "tests"
    if (folder / "test_models.py").is_file():
        return folder
    with tempfile.TemporaryDirectory() as download:
        try:
            subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
                            f"timm=={version}", "-d", download], check=True, capture_output=True, timeout=300)
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as err:
            output = getattr(err, "stderr", b"") or b""
            pytest.skip(f"cannot fetch timm {version}'s sdist from PyPI ({output.decode(errors='replace')[-300:]}); "
                        f"set TIMM_TESTS_DIR to an extracted timm-{version}/tests folder")
        sdists = list(Path(download).glob("timm-*.tar.gz"))
        if not sdists:
            pytest.skip(f"pip downloaded no sdist for timm {version}")
        staging = Path(tempfile.mkdtemp(dir=folder.parent.parent))
        _extract_tests(sdists[0], f"timm-{version}/tests/", staging)
        folder.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.replace(staging, folder)
        except OSError:  # another run filled the cache first
            shutil.rmtree(staging, ignore_errors=True)
    if not (folder / "test_models.py").is_file():
        pytest.skip(f"timm {version}'s sdist has no tests/test_models.py")
    return folder


def suite_command(tests_dir, junit):
    """timm's test_models.py with our plugin, none of timm's or our pytest configuration, our selection."""
    return [sys.executable, "-m", "pytest", str(tests_dir / "test_models.py"), "-p", "timm_suite_plugin",
            "-c", os.devnull, "--rootdir", str(tests_dir), "--import-mode=importlib", "-p", "no:cacheprovider",
            "-W", "ignore::pytest.PytestUnknownMarkWarning", "-q", "--tb=short", "-rfEs", "-k", SELECTION,
            f"--junitxml={junit}"]


def results_by_test(junit):
    """{(function, outcome): count} from a junit report."""
    counts = Counter()
    for case in ET.parse(junit).iter("testcase"):
        outcome = next((child.tag for child in case if child.tag in ("failure", "error", "skipped")), "passed")
        counts[case.get("name").split("[")[0], outcome] += 1
    return counts


@pytest.mark.slow
def test_timm_model_suite_passes_on_project_models(tmp_path):
    tests_dir = timm_tests_dir()
    junit = tmp_path / "timm_suite.xml"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(TESTS), str(ROOT),
                                                                    os.environ.get("PYTHONPATH")])))
    command = suite_command(tests_dir, junit)
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1200)
    counts = results_by_test(junit) if junit.exists() else Counter()
    print("command:", " ".join(command))
    for function in sorted({name for name, _ in counts}):
        print(f"{function}: " + ", ".join(f"{n} {outcome}" for (name, outcome), n in sorted(counts.items())
                                          if name == function))
    report, returncode = result.stdout[-6000:] + result.stderr[-2000:], result.returncode
    assert returncode == 0, f"timm's test_models.py failed on our models:\n{report}"
    assert not any(outcome in ("failure", "error") for _, outcome in counts), report
    missing = [name for name in EXPECTED_TESTS if counts[name, "passed"] == 0]
    assert not missing, f"no passing case of {missing}:\n{report}"
