"""The project as an installed package: the README's backbone example from another folder, and a wheel
(`pip install .`) in a fresh virtual environment that builds and loads every registered model."""
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import timm

import advarm  # noqa: F401  (registers every model with timm)

ROOT = Path(__file__).resolve().parents[1]
MODULES = ["models_adventurer", "models_arm"]


def readme_backbone_example():
    """The python block under the README's 'Use the backbone in your own code' heading."""
    text = (ROOT / "README.md").read_text()
    match = re.search(r"use the backbone in your own code.*?```python\n(.*?)```", text, re.IGNORECASE | re.DOTALL)
    assert match, "README.md has no 'Use the backbone in your own code' python block"
    return match.group(1)


def run_elsewhere(python, code, cwd, *args):
    """`python -c code` in `cwd` with no PYTHONPATH, so only an installed copy of the project can be imported."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run([str(python), "-c", code, *args], cwd=cwd, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


def test_readme_backbone_example_runs_from_another_folder(tmp_path):
    example = readme_backbone_example()
    assert len(example.strip().splitlines()) == 3
    out = run_elsewhere(sys.executable, example + "print(tuple(features.shape))\n", tmp_path)
    assert out.strip().splitlines()[-1] == "(1, 197, 256)"


CHECK_INSTALLED = """
import sys, torch, timm, advarm, models_adventurer, models_arm
assert all(m.__file__.startswith(sys.prefix) for m in (advarm, models_adventurer, models_arm)), advarm.__file__
names = timm.list_models(module=["models_adventurer", "models_arm"])
for name in names:
    timm.create_model(name, device="meta")
for name in ("adventurer_tiny_patch16", "arm_base_pz16"):
    source = timm.create_model(name, depth=2, embed_dim=32, img_size=64, num_classes=3)
    advarm.save_checkpoint({"model": source.state_dict()}, sys.argv[1] + f"/{name}.pth")
    loaded = timm.create_model(name, depth=2, embed_dim=32, img_size=64, num_classes=3)
    advarm.load_weights(loaded, sys.argv[1] + f"/{name}.pth")
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in source.state_dict().items())
print(len(names))
"""


@pytest.mark.slow
def test_wheel_installs_the_package_and_the_two_model_files_only(tmp_path):
    pytest.importorskip("setuptools", reason="building without isolation needs setuptools in this environment")
    source = tmp_path / "src"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".git", "__pycache__", "*.egg-info", "build", "out",
                                                                ".pytest_cache", "output*", "runs", "wandb", "mlruns"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet", "-w",
                    str(tmp_path / "dist"), str(source)], check=True, capture_output=True, timeout=300)
    wheel, = (tmp_path / "dist").glob("advarm-*.whl")
    top_level = {name.split("/")[0] for name in zipfile.ZipFile(wheel).namelist()}
    assert {name for name in top_level if not name.endswith(".dist-info")} == {"advarm", *(f"{m}.py" for m in MODULES)}

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)], check=True,
                   timeout=120)
    python = venv / "bin" / "python"
    subprocess.run([str(python), "-m", "pip", "install", "--no-deps", "--no-index", "--quiet", str(wheel)], check=True,
                   capture_output=True, timeout=300)
    elsewhere = tmp_path / "another_project"
    elsewhere.mkdir()
    out = run_elsewhere(python, CHECK_INSTALLED, elsewhere, str(elsewhere))
    assert int(out.strip().splitlines()[-1]) == len(timm.list_models(module=MODULES))
