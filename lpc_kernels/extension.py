"""The C++/CUDA extension ``lpc_kernels._C``: what it is built from (one home for ``setup.py`` and the first-use
build), and how an installed package gets it.

A checkout builds it in place (``make build``: ``setup.py build_ext --inplace``); ``pip install
--no-build-isolation`` with torch importable builds it into the wheel. A plain ``pip install`` builds in an isolated
environment without torch, so the wheel is pure Python and ships ``csrc/`` as ``lpc_kernels/csrc``: on first import
``load_extension`` compiles it with ``torch.utils.cpp_extension.load`` into a cache directory keyed by the torch,
CUDA and Python versions and a hash of the sources and flags, and later imports load the cached library.
``LPC_KERNELS_BUILD_EXT=0`` turns both builds off. This module imports nothing at load time but the standard
library: ``setup.py`` reads it before torch may be importable.
"""

from __future__ import annotations

import glob
import hashlib
import importlib
import importlib.util
import os
import shutil
import sys
import time
from pathlib import Path
from typing import NamedTuple, Optional

CXX_FLAGS = ["-O3", "-g0", "-fopenmp"]  # -g0: no debug info, half the build time on 2 cores
LINK_FLAGS = ["-fopenmp"]
NVCC_FLAGS = ["-O3", "--use_fast_math", "-lineinfo", "--expt-relaxed-constexpr"]
# Hopper when no GPU is visible to query the architecture from (our build machines have none)
DEFAULT_CUDA_ARCH = "9.0"
BUILD_EXT_ENV = "LPC_KERNELS_BUILD_EXT"
CACHE_ENV = "LPC_KERNELS_CACHE"


def build_enabled() -> bool:
    """False when ``LPC_KERNELS_BUILD_EXT=0``: neither ``setup.py`` nor the first import compiles anything."""
    return os.environ.get(BUILD_EXT_ENV, "1") != "0"


def sources(csrc: str, *, cuda: bool) -> list[str]:
    """The extension's source files under ``csrc``: the schemas and CPU kernels, with ``cuda`` also the CUDA ops'
    host-side checks (``csrc/cuda/*.cpp``, compiled by the host compiler: see ``csrc/cuda/checks.h``) and kernels."""
    out = sorted(glob.glob(os.path.join(csrc, "*.cpp")) + glob.glob(os.path.join(csrc, "cpu", "*.cpp")))
    if cuda:
        out += sorted(glob.glob(os.path.join(csrc, "cuda", "*.cpp")))
        out += sorted(glob.glob(os.path.join(csrc, "cuda", "*.cu")))
    return out


class ExtensionStatus(NamedTuple):
    """What ``load_extension`` found: ``error`` is None when the extension is loaded, else why not; ``origin`` says
    which library was loaded (the in-place or wheel ``_C``, or the first-use build and its cache directory)."""

    error: Optional[str]
    origin: Optional[str]


def _note(message: str) -> None:
    print(f"lpc_kernels: {message}", file=sys.stderr, flush=True)


def shipped_sources_dir() -> Optional[Path]:
    """``lpc_kernels/csrc`` of an installed wheel (a checkout keeps them in ``csrc/``, built by ``make build``)."""
    path = Path(__file__).resolve().parent / "csrc"
    return path if (path / "ops.cpp").is_file() else None


def build_hint() -> str:
    """How to get the extension: ``make build`` in a checkout; an installed package builds it on first import."""
    if shipped_sources_dir() is None:
        return "run `make build`"
    return f"it is built on first import unless {BUILD_EXT_ENV}=0 (needs a C++ compiler and ninja)"


def cache_root() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "lpc-kernels" / "ext")


def _cuda_build_plan(torch) -> tuple[bool, Optional[str], str]:
    """``(with CUDA kernels, TORCH_CUDA_ARCH_LIST to set or None, why not CUDA)``."""
    if torch.version.cuda is None:
        return False, None, "CPU-only torch"
    from torch.utils.cpp_extension import CUDA_HOME

    if CUDA_HOME is None:
        return False, None, "no CUDA toolkit (nvcc) found: CPU kernels only"
    arch = None
    if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        arch = DEFAULT_CUDA_ARCH
    return True, arch, ""


def build_directory(csrc: Path, flags: list, torch) -> Path:
    """The cache directory of one build: torch, CUDA and Python versions, and a hash of every file under ``csrc``
    (headers too: a changed ``.h`` must rebuild) and of the flags."""
    digest = hashlib.sha256(repr(flags).encode())
    for path in sorted(p for p in csrc.rglob("*") if p.is_file()):
        digest.update(path.relative_to(csrc).as_posix().encode() + b"\0" + path.read_bytes())
    cuda = f"cu{torch.version.cuda.replace('.', '')}" if torch.version.cuda else "cpu"
    tag = f"torch{torch.__version__.replace('+', '_')}-{cuda}-py{sys.version_info.major}{sys.version_info.minor}"
    return cache_root() / f"{tag}-{digest.hexdigest()[:16]}"


def _import_library(package: str, library: Path):
    """Import a built ``_C`` library as ``<package>._C`` (what ``lpc_kernels._cpp`` imports)."""
    spec = importlib.util.spec_from_file_location(f"{package}._C", library)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sys.modules[f"{package}._C"] = module
    return module


def _compile(files: list[str], build_dir: Path, with_cuda: bool, arch: Optional[str]) -> None:
    """``torch.utils.cpp_extension.load`` into ``build_dir`` (ninja; a lock file there serialises processes)."""
    from torch.utils.cpp_extension import load

    saved = {key: os.environ.get(key) for key in ("PATH", "TORCH_CUDA_ARCH_LIST")}
    try:
        try:
            import ninja  # the pip package: its binary is not on PATH when the venv is not activated

            os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
        except (ImportError, AttributeError):
            pass
        if arch is not None:
            os.environ["TORCH_CUDA_ARCH_LIST"] = arch
        build_dir.mkdir(parents=True, exist_ok=True)
        load(name="_C", sources=files, extra_cflags=CXX_FLAGS, extra_ldflags=LINK_FLAGS,
             extra_cuda_cflags=NVCC_FLAGS if with_cuda else None, build_directory=str(build_dir),
             with_cuda=with_cuda, is_python_module=False, verbose=False)
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _build_on_first_use(package: str, csrc: Path) -> ExtensionStatus:
    """Load the cached build of the shipped sources, compiling it first when there is none."""
    import torch

    with_cuda, arch, cuda_note = _cuda_build_plan(torch)
    flags = [CXX_FLAGS, LINK_FLAGS, NVCC_FLAGS if with_cuda else None, arch or os.environ.get("TORCH_CUDA_ARCH_LIST")]
    build_dir = build_directory(csrc, flags, torch)
    library = build_dir / "_C.so"
    origin = f"first-use build, cached in {build_dir}"
    if library.is_file():
        try:
            _import_library(package, library)
            return ExtensionStatus(None, origin)
        except (ImportError, OSError):
            pass  # a broken cache entry: build it again
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        reason = "not built: no C++ compiler (c++) found to build it on first use"
        _note(f"{reason}; using the reference/triton backends")
        return ExtensionStatus(reason, None)
    kernels = "C++ CPU" + (" and CUDA" if with_cuda else "") + " kernels"
    _note(f"compiling the {kernels} for torch {torch.__version__} (first use, a minute or more; cached in "
          f"{build_dir}; {BUILD_EXT_ENV}=0 skips it)" + (f" [{cuda_note}]" if cuda_note and torch.version.cuda else ""))
    start = time.perf_counter()
    try:
        _compile(sources(str(csrc), cuda=with_cuda), build_dir, with_cuda, arch)
        _import_library(package, library)
    except Exception as exc:  # noqa: BLE001  compiler, ninja or linker errors: the package still works without it
        log = build_dir / "build-error.log"
        try:
            log.write_text(f"{type(exc).__name__}: {exc}\n")
            where = f"; details in {log}"
        except OSError:
            where = ""
        text = str(exc).strip()
        reason = f"first-use build failed ({text.splitlines()[0][:200] if text else type(exc).__name__}{where})"
        _note(f"could not compile the C++ kernels: {reason}; using the reference/triton backends")
        return ExtensionStatus(reason, None)
    _note(f"compiled in {time.perf_counter() - start:.0f} s")
    return ExtensionStatus(None, origin)


def load_extension(package: str) -> ExtensionStatus:
    """Load ``<package>._C``: the in-place or wheel build when present, else (installed from a pure-Python wheel)
    the first-use build. Never raises: without a compiler, or when a build fails, ``error`` says why."""
    spec = importlib.util.find_spec(f"{package}._C")
    if spec is not None:
        try:
            importlib.import_module(f"{package}._C")
        except (ImportError, OSError) as exc:  # e.g. built against another torch
            return ExtensionStatus(f"import failed: {exc}", None)
        return ExtensionStatus(None, f"{package}._C at {spec.origin}")
    csrc = shipped_sources_dir()
    if csrc is None:
        return ExtensionStatus("not built", None)
    if not build_enabled():
        return ExtensionStatus(f"not built ({BUILD_EXT_ENV}=0 skips the first-use build)", None)
    return _build_on_first_use(package, csrc)
