"""The built wheel works on its own: installed into a fresh venv without extras (torch and numpy only, taken from
this environment so nothing downloads), `attnmask --version` and `attnmask demo` run, and `attnmask bench` says in
one line that it needs a checkout. About 20 s: one wheel build, one venv without pip."""

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

import attnmask

ROOT = Path(__file__).resolve().parents[1]
# Extras and anything attnmask: the fresh venv must see torch, numpy and their own dependencies, nothing else.
HIDDEN = ("matplotlib", "mpl_toolkits", "transformers", "tokenizers", "datasets", "pyarrow", "trl", "attnmask", "_")


def clean_env() -> dict:
    """This environment without PYTHONPATH: the checkout's ``src`` (and its ``attnmask.egg-info``) must not be seen."""
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "ATTNMASK_STRICT_DEPS")}


def visible_dependencies(target: Path) -> Path:
    """A folder of links to this environment's packages except the extras, for the fresh venv's ``.pth`` file."""
    site = Path(sysconfig.get_paths()["purelib"])
    target.mkdir()
    for entry in site.iterdir():
        name = entry.name.lower()
        if name.endswith(".pth") or name.startswith(HIDDEN) or name.startswith("__editable__"):
            continue
        (target / entry.name).symlink_to(entry)
    return target


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    if shutil.which("pip", path=str(Path(sys.executable).parent)) is None:
        pytest.skip("this environment has no pip to install the wheel with")
    tmp = tmp_path_factory.mktemp("wheel")
    # Built from a copy: setuptools writes build/ and *.egg-info next to the sources, and two test workers may build.
    source = tmp / "source"
    skip = shutil.ignore_patterns("__pycache__", "*.egg-info", "*.so")
    shutil.copytree(ROOT / "src", source / "src", ignore=skip)
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, source / name)
    built = subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(tmp / "dist"), str(source)],
        capture_output=True,
        text=True,
        timeout=120,
        env=clean_env(),
    )
    assert built.returncode == 0, built.stdout[-2000:] + built.stderr[-2000:]
    (wheel,) = (tmp / "dist").glob("attnmask-*.whl")
    subprocess.run(
        [sys.executable, "-m", "venv", "--without-pip", str(tmp / "venv")], check=True, timeout=60, env=clean_env()
    )
    python = tmp / "venv" / "bin" / "python"
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps", "--no-index", str(wheel)],
        check=True,
        timeout=120,
        env=clean_env(),
    )
    fresh_site = Path(
        subprocess.check_output([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"])
        .decode()
        .strip()
    )
    (fresh_site / "dependencies.pth").write_text(str(visible_dependencies(tmp / "deps")) + "\n")
    return tmp, wheel, tmp / "venv" / "bin" / "attnmask"


def run(installed, *args):
    tmp, _, command = installed
    return subprocess.run(
        [str(command), *args], capture_output=True, text=True, cwd=tmp, env=clean_env(), timeout=120, encoding="utf-8"
    )


def test_installed_wheel_works_alone(installed):
    """One test, so that one wheel is built even when the tests run in several workers."""
    names = zipfile.ZipFile(installed[1]).namelist()
    assert {"attnmask/py.typed", "attnmask/backends/segattn.c"} <= set(names)
    assert any(n.endswith("licenses/LICENSE") for n in names)
    metadata = zipfile.ZipFile(installed[1]).read("attnmask-0.1.0.dist-info/METADATA").decode()
    assert "License-Expression: Apache-2.0" in metadata

    version = run(installed, "--version")
    assert version.returncode == 0 and version.stdout.strip() == f"attnmask {attnmask.__version__}", version.stderr

    demo = run(installed, "demo", "--out", "pictures")  # no matplotlib in the fresh venv: pictures skipped
    assert demo.returncode == 0, demo.stderr
    assert "every token kept: yes" in demo.stdout
    assert "Pictures skipped: matplotlib is not installed" in demo.stdout
    assert "Traceback" not in demo.stderr

    bench = run(installed, "bench", "--quick")  # the benchmarks live in the repository, next to RESULTS.md
    assert bench.returncode == 2
    assert bench.stderr.count("\n") == 1 and "from a checkout of the repository" in bench.stderr
