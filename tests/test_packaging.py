"""What ``pip install samtone-kernels`` gives a user: the wheel and sdist build (``python -m build``),
the wheel holds the package alone, and installed into a fresh virtual environment it runs the
README's training loop from outside the repository."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import sysconfig
import tarfile
import zipfile
from pathlib import Path

import pytest

from helpers import require

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def dist(tmp_path_factory) -> Path:
    require("build")
    out = tmp_path_factory.mktemp("dist")
    subprocess.run(
        [sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), str(ROOT)],
        check=True,
        capture_output=True,
        text=True,
    )
    return out


def test_wheel_holds_the_package_and_sdist_the_sources(dist):
    (wheel,) = dist.glob("samtone_kernels-*.whl")
    (sdist,) = dist.glob("samtone_kernels-*.tar.gz")
    names = zipfile.ZipFile(wheel).namelist()
    assert (
        "samtone_kernels/_triton/kernels.py" in names
        and "samtone_kernels/integrations/sentence_transformers/__init__.py" in names
    )
    assert all(n.startswith(("samtone_kernels/", "samtone_kernels-")) for n in names), names
    with tarfile.open(sdist) as tar:
        files = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    for needed in (
        "reference/__init__.py",
        "tests/helpers.py",
        "tests/conftest.py",
        "Makefile",
        "LICENSE",
        "bench/speed.py",
        "bench/quality/cli.py",
        "examples/ddp_samtone.py",
        "tools/kernel_analysis/compile_for_gpu.py",
    ):
        assert needed in files, needed
    assert not any(f.startswith("bench/results") or "__pycache__" in f for f in files)


def test_the_installed_wheel_runs_the_readme_loop(dist, tmp_path):
    """A fresh virtual environment sees this interpreter's third-party packages (torch, numpy) through
    a path entry, which does not run their .pth files: the repository's editable install stays out,
    so ``samtone_kernels`` can come only from the wheel."""
    (wheel,) = dist.glob("samtone_kernels-*.whl")
    env = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env)], check=True)
    python = env / "bin" / "python"
    own = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    Path(own, "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            str(python),
            "install",
            "-q",
            "--no-deps",
            "--no-index",
            "--ignore-installed",
            str(wheel),
        ],
        check=True,
        capture_output=True,
        text=True,
    )
    loop = next(
        b
        for b in re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
        if "for step in range" in b
    )
    check = (
        "import sys\n"
        "sys.modules['triton'] = None  # triton is optional: the README loop runs without it\n"
        "import samtone_kernels, importlib.util\n"
        f"assert samtone_kernels.__file__.startswith({own!r}), samtone_kernels.__file__\n"
        "assert importlib.util.find_spec('reference') is None\n"
        "assert not samtone_kernels.triton_available()\n"
    )
    clean = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # an inherited one would find the checkout
    done = subprocess.run(
        [str(python), "-c", check + loop], cwd=tmp_path, env=clean, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert re.search(r"loss \d+\.\d+", done.stdout), done.stdout
