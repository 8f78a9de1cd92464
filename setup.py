"""Builds lpc_kernels._C from csrc/ when torch is importable: a CppExtension on CPU-only torch, a CUDAExtension when
torch.version.cuda is set (GPU visible or not). Without torch (a plain `pip install`, whose isolated build
environment has none) the wheel is pure Python and ships csrc/ as lpc_kernels/csrc, compiled on first import
(lpc_kernels/extension.py). LPC_KERNELS_BUILD_EXT=0 skips the extension; the package then runs on its reference
and triton backends."""

import importlib.util
import os

from setuptools import setup

# the sources and flags, read from the package without importing it (its __init__ needs torch)
_spec = importlib.util.spec_from_file_location(
    "lpc_kernels_extension", os.path.join(os.path.dirname(os.path.abspath(__file__)), "lpc_kernels", "extension.py"))
extension = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(extension)

ext_modules, cmdclass = [], {}
if extension.build_enabled() and importlib.util.find_spec("torch") is not None:
    import torch
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    # No -std flag: BuildExtension adds the C++ standard this torch's headers need (C++20 for torch 2.14).
    cxx = extension.CXX_FLAGS
    sources = extension.sources("csrc", cuda=torch.version.cuda is not None)
    if torch.version.cuda is None:
        ext = CppExtension("lpc_kernels._C", sources, extra_compile_args={"cxx": cxx},
                           extra_link_args=extension.LINK_FLAGS)
    else:
        # Hopper by default: our build machines have no GPU for torch to query the architecture from.
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", extension.DEFAULT_CUDA_ARCH)
        ext = CUDAExtension("lpc_kernels._C", sources, extra_compile_args={"cxx": cxx, "nvcc": extension.NVCC_FLAGS},
                            extra_link_args=extension.LINK_FLAGS)
    ext_modules = [ext]
    cmdclass = {"build_ext": BuildExtension.with_options(no_python_abi_suffix=False)}

setup(ext_modules=ext_modules, cmdclass=cmdclass)
