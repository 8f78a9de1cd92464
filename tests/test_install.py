"""``pip install`` of the checkout, as a user outside the checkout meets it: the isolated default build gives a
pure-Python wheel (so does the sdist), which installs into a fresh venv next to an installed torch without
touching it, and whose first import compiles the CPU kernels into a cache, loaded again on the next import.

This is the CI step of the install path: it runs under ``make test``. The isolated build fetches setuptools and
wheel from the package index; everything else comes from this interpreter's environment, which the fresh venv sees
through a ``.pth`` file (the user's installed torch), so ``--no-index`` installs nothing but the wheel.
"""

import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path
from typing import NamedTuple

import pytest
import torch

from tests.helpers import REPO

pytestmark = pytest.mark.slow

# what a wheel needs from the checkout (tests, benches and docs are not shipped)
SHIPPED = ("lpc", "lpc_kernels", "csrc", "setup.py", "pyproject.toml", "README.md")
CSRC_FILES = sorted(p.relative_to(REPO / "csrc").as_posix() for p in (REPO / "csrc").rglob("*") if p.is_file())
PACKAGES = sorted(".".join(p.parent.relative_to(REPO).parts) for name in ("lpc", "lpc_kernels")
                  for p in (REPO / name).rglob("__init__.py"))


def _run(cmd, **kw) -> subprocess.CompletedProcess:
    result = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=600, **kw)
    assert result.returncode == 0, f"{cmd} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def _checkout_copy(dest: Path) -> Path:
    """The shipped files of the checkout, without build outputs (no in-place ``_C``, no egg-info in the checkout)."""
    ignore = shutil.ignore_patterns("__pycache__", "*.so", "*.egg-info", "build")
    for name in SHIPPED:
        src = REPO / name
        (shutil.copytree(src, dest / name, ignore=ignore) if src.is_dir() else shutil.copy(src, dest / name))
    return dest


class Installed(NamedTuple):
    """The wheel of ``pip wheel <checkout>`` installed into a fresh venv, and the sdist built beside it."""

    python: Path  # the venv's interpreter
    wheel: Path
    sdist: Path
    root: Path  # a directory outside the checkout
    env: dict  # the environment to run the venv's interpreter in


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Installed:
    root = tmp_path_factory.mktemp("install")
    src = _checkout_copy(root / "src")
    env = {k: v for k, v in os.environ.items() if k not in ("LPC_KERNELS_BUILD_EXT", "PYTHONPATH")}
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", root / "dist", src], env=env)
    _run([sys.executable, "-c", f"from setuptools import build_meta; build_meta.build_sdist({str(root / 'sdist')!r})"],
         cwd=src, env={**env, "LPC_KERNELS_BUILD_EXT": "0"})
    venv = root / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", venv])
    python = venv / "bin" / "python"
    # the environment a user's torch lives in (site-packages of this interpreter: torch, pip, setuptools), visible to
    # the fresh venv, which has nothing of its own to shadow it
    site = _run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip()
    theirs = sorted({p for p in sys.path if p.endswith(("site-packages", "dist-packages")) and Path(p).is_dir()})
    Path(site, "user-env.pth").write_text("\n".join(theirs) + "\n")
    wheel, = (root / "dist").glob("*.whl")
    sdist, = (root / "sdist").glob("*.tar.gz")
    _run([python, "-m", "pip", "install", "-q", "--no-index", wheel], env=env, cwd=root)
    return Installed(python, wheel, sdist, root, env)


def test_the_wheel_is_pure_python_and_ships_every_package_and_the_sources(installed):
    wheel, sdist = installed.wheel, installed.sdist
    assert wheel.name.endswith("-py3-none-any.whl")  # no compiled code: any torch, built on first use
    names = set(zipfile.ZipFile(wheel).namelist())
    for package in PACKAGES:
        assert f"{package.replace('.', '/')}/__init__.py" in names, package
    assert {f"lpc_kernels/csrc/{f}" for f in CSRC_FILES} <= names
    with tarfile.open(sdist) as tar:
        members = {m.name.split("/", 1)[1] for m in tar.getmembers() if "/" in m.name}
    assert {f"csrc/{f}" for f in CSRC_FILES} <= members and "setup.py" in members
    # pip install <sdist>: the same wheel
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", installed.root / "from-sdist", sdist],
         env=installed.env)
    again, = (installed.root / "from-sdist").glob("*.whl")
    assert again.name == wheel.name and set(zipfile.ZipFile(again).namelist()) == names


def test_installed_package_builds_its_kernels_on_first_use_and_runs_an_op(installed, tmp_path):
    python, root = installed.python, installed.root
    env = {**installed.env, "LPC_KERNELS_CACHE": str(tmp_path / "ext"), "LPC_KERNELS_BACKEND": ""}
    env.pop("TRITON_INTERPRET", None)
    script = ("import torch, lpc_kernels as lk, lpc_kernels.backends as b\n"
              "h = torch.randn(6, 8, dtype=torch.float64); w = torch.randn(11, 8, dtype=torch.float64)\n"
              "y = torch.randint(0, 11, (6,))\n"
              "print(lk.__file__); print(torch.__file__); print(b.resolve_backend('auto', h.device))\n"
              "ref = torch.log_softmax(h @ w.T, -1).gather(1, y[:, None])[:, 0]\n"
              "print(float((lk.linear_token_logprobs(h, w, y) - ref).abs().max()))\n")
    first = _run([python, "-c", script], cwd=root, env=env)  # cwd outside the checkout: the installed copy
    package, torch_file, backend, error = first.stdout.split()
    assert Path(package).is_relative_to(root / "venv") and torch_file == torch.__file__  # the user's torch, kept
    assert backend == "cpu" and float(error) < 1e-12
    assert "compiling the C++ CPU kernels" in first.stderr and "compiled in" in first.stderr
    assert list((tmp_path / "ext").glob("*/_C.so"))
    again = _run([python, "-c", script], cwd=root, env=env)
    assert "compiling" not in again.stderr and again.stdout.split()[2] == "cpu"  # the cached build
    info = _run([python, "-m", "lpc_kernels.info"], cwd=root, env=env).stdout
    assert f"extension lpc_kernels._C: loaded: first-use build, cached in {tmp_path / 'ext'}" in info
    assert "backends for cpu tensors (auto -> cpu)" in info


def test_without_the_build_the_installed_package_says_why_and_runs_the_reference(installed, tmp_path):
    python, root = installed.python, installed.root
    env = {**installed.env, "LPC_KERNELS_CACHE": str(tmp_path / "ext"), "LPC_KERNELS_BUILD_EXT": "0"}
    out = _run([python, "-m", "lpc_kernels.info"], cwd=root, env=env)
    assert "extension lpc_kernels._C: unavailable: not built (LPC_KERNELS_BUILD_EXT=0" in out.stdout
    assert "auto -> reference" in out.stdout and not out.stderr.strip() and not (tmp_path / "ext").exists()
    # no compiler: one line at import, no traceback, the reference backend
    env = {**env, "LPC_KERNELS_BUILD_EXT": "1", "CXX": "no-such-compiler"}
    out = _run([python, "-m", "lpc_kernels.info"], cwd=root, env=env)
    assert "unavailable: not built: no C++ compiler" in out.stdout and "Traceback" not in out.stderr
