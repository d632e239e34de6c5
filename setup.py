"""Build of handlstm_cuda and its native extension handlstm_cuda._C.

Build decisions, printed at build time:

* CPU sources are always built. CUDA sources join the build when torch was built with CUDA and
  a CUDA toolkit (nvcc) is found; no visible GPU is needed. Set HANDLSTM_FORCE_CPU=1 to build
  the CPU kernels only.
* CUDA architectures come from TORCH_CUDA_ARCH_LIST; the default here is "8.0;9.0+PTX"
  (A100, H100/H200, and PTX for newer GPUs). MAX_JOBS is honoured by torch's ninja build.
* HANDLSTM_DEBUG=1 builds with -O0 -g (and -G for device code).
* The CUDA toolkit of some installs (this project's CI among them) lacks the cuBLAS/cuSPARSE
  headers that torch's CUDA headers include; the pip-installed nvidia-* packages that come with
  a CUDA build of torch carry them, so their include folders are added when present.
"""

import glob
import os
import shutil
import sys

from setuptools import find_packages, setup

# torch.utils.cpp_extension reads CUDA_HOME at import; prefer the canonical toolkit folder
# over whatever folder an `nvcc` on PATH happens to live in.
if "CUDA_HOME" not in os.environ and os.path.exists("/usr/local/cuda/bin/nvcc"):
    os.environ["CUDA_HOME"] = "/usr/local/cuda"

import torch  # noqa: E402
from torch.utils import cpp_extension  # noqa: E402

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_ARCH_LIST = "8.0;9.0+PTX"


def log(msg):
    print(f"[handlstm_cuda setup] {msg}", file=sys.stderr)


def want_cuda():
    if os.environ.get("HANDLSTM_FORCE_CPU", "0") == "1":
        return False, "HANDLSTM_FORCE_CPU=1"
    if torch.version.cuda is None:
        return False, f"torch {torch.__version__} was built without CUDA"
    home = cpp_extension.CUDA_HOME
    if home is None or not os.path.exists(os.path.join(home, "bin", "nvcc")):
        return False, f"no CUDA toolkit found (CUDA_HOME={home!r})"
    return True, f"torch CUDA {torch.version.cuda}, toolkit {home}"


def nvidia_pip_include_dirs():
    """Include folders of the nvidia-* wheels that a CUDA build of torch depends on."""
    dirs = []
    for entry in sys.path:
        nv = os.path.join(entry, "nvidia")
        if os.path.isdir(nv):
            dirs += sorted(glob.glob(os.path.join(nv, "*", "include")))
    return [d for d in dirs if os.path.exists(os.path.join(d, "cublas_v2.h"))]


def openmp_flag():
    """-fopenmp where torch runs its intra-op threads on OpenMP and GCC/Clang on Linux can
    compile it; None elsewhere (the CPU kernels then run on one thread)."""
    if torch._C.has_openmp and sys.platform.startswith("linux"):
        return "-fopenmp"
    return None


def extensions():
    use_cuda, why = want_cuda()
    debug = os.environ.get("HANDLSTM_DEBUG", "0") == "1"
    opt = ["-O0", "-g"] if debug else ["-O3"]
    # The ISA units (cell_cpu_avx2/avx512, gemm_cpu_bf16) stay last: where shared headers leave a weak symbol
    # in every unit (std::exp(float) in a -O0 build), the linker keeps the first definition, so
    # the generic code never gets a copy compiled for AVX-512. Our own headers put their code
    # in a namespace per ISA unit (see gate_math.h).
    sources = [
        "csrc/lstm_ops.cpp",
        "csrc/lstm_driver.cpp",
        "csrc/lstm_cpu.cpp",
        "csrc/cuda_loop_choice.cpp",
        "csrc/cpu/cell_cpu_avx2.cpp",
        "csrc/cpu/cell_cpu_avx512.cpp",
        "csrc/cpu/gemm_cpu_bf16.cpp",
    ]
    # ATen's vector headers carry `#pragma unroll` hints that GCC does not know.
    cxx = list(opt) + ["-Wno-unknown-pragmas"]
    kwargs = dict(include_dirs=[os.path.join(ROOT, "csrc")])
    # at::parallel_for is an inline template that runs serially unless the including unit is
    # compiled with OpenMP: without this flag every CPU thread split of ours (row blocks,
    # pointwise passes, packed-GEMM panels) silently ran on one thread. The runtime is the
    # libgomp torch already loaded (same soname), so there is one thread pool.
    if openmp_flag():
        cxx.append(openmp_flag())
        kwargs["extra_link_args"] = [openmp_flag()]
    if use_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCH_LIST)
        sources += ["csrc/lstm_cuda.cu", "csrc/lstm_cuda_persistent.cu",
                    "csrc/lstm_cuda_cooperative.cu", "csrc/lstm_cuda_graph.cpp"]
        nvcc = opt + (["-G"] if debug else []) + ["-DHANDLSTM_WITH_CUDA"]
        extra_inc = nvidia_pip_include_dirs()
        kwargs["include_dirs"] += extra_inc
        log(f"building CPU + CUDA kernels ({why}); arch list "
            f"{os.environ['TORCH_CUDA_ARCH_LIST']}; extra include dirs {extra_inc or 'none'}")
        ext = cpp_extension.CUDAExtension(
            "handlstm_cuda._C",
            sources,
            extra_compile_args={"cxx": cxx + ["-DHANDLSTM_WITH_CUDA"], "nvcc": nvcc},
            **kwargs,
        )
    else:
        log(f"building CPU kernels only ({why})")
        ext = cpp_extension.CppExtension(
            "handlstm_cuda._C", sources, extra_compile_args={"cxx": cxx}, **kwargs
        )
    log(f"MAX_JOBS={os.environ.get('MAX_JOBS', 'unset')}, ninja={shutil.which('ninja') is not None}"
        f", debug={debug}")
    return [ext]


setup(
    name="handlstm_cuda",
    version="0.1.0",
    description="Fused LSTM with a hand-derived backward, CPU and CUDA kernels for PyTorch",
    packages=find_packages(include=["handlstm_cuda", "handlstm_cuda.*"]),
    # The measured CUDA crossovers, when a GPU run has produced them (see _ops.py).
    package_data={"handlstm_cuda": ["*.json"]},
    ext_modules=extensions(),
    cmdclass={"build_ext": cpp_extension.BuildExtension},
    python_requires=">=3.9",
    install_requires=["torch>=2.4", "numpy"],
)
