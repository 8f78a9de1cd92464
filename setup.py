"""Builds lpc_kernels._C from csrc/: a CppExtension on CPU-only torch, a CUDAExtension when
torch.version.cuda is set (GPU visible or not). LPC_KERNELS_BUILD_EXT=0 skips the extension; the
package then runs on its reference and triton backends."""

import glob
import os

from setuptools import setup

ext_modules, cmdclass = [], {}
if os.environ.get("LPC_KERNELS_BUILD_EXT", "1") != "0":
    import torch
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    here = os.path.dirname(os.path.abspath(__file__))
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")) + glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    # No -std flag: BuildExtension adds the C++ standard this torch's headers need (C++20 for torch 2.14).
    cxx = ["-O3", "-g0", "-fopenmp"]  # -g0: no debug info, half the build time on 2 cores
    if torch.version.cuda is None:
        ext = CppExtension("lpc_kernels._C", sources, extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"])
    else:
        # Hopper by default: our build machines have no GPU for torch to query the architecture from.
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0")
        # csrc/cuda/*.cpp (the CUDA ops' argument checks) go to the host compiler, not nvcc: see
        # csrc/cuda/checks.h for why no nvcc-compiled code formats an error message.
        sources += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cpp")))
        sources += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
        nvcc = ["-O3", "--use_fast_math", "-lineinfo", "--expt-relaxed-constexpr"]
        ext = CUDAExtension("lpc_kernels._C", sources, extra_compile_args={"cxx": cxx, "nvcc": nvcc},
                            extra_link_args=["-fopenmp"])
    ext_modules = [ext]
    cmdclass = {"build_ext": BuildExtension.with_options(no_python_abi_suffix=False)}

setup(ext_modules=ext_modules, cmdclass=cmdclass)
