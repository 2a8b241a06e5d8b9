"""Build script for fastattn's C++/CUDA extensions (metadata lives in pyproject.toml).

Extensions, each with one switch:
  fastattn._C       CPU kernels + op schemas; always built (-O3, OpenMP, baseline ISA:
                    AVX2/FMA paths are chosen at run time, never -march=native).
                    FASTATTN_SANITIZE=address,undefined builds it with AddressSanitizer and
                    UndefinedBehaviorSanitizer (-O1 -g, abort on the first error): for tests only.
  fastattn._C_cuda  CUDA kernels from csrc/cuda/*.cu. FASTATTN_CUDA=1 forces it (and
                    fails loudly if torch has no CUDA or nvcc is missing), FASTATTN_CUDA=0
                    skips it; by default it is built when torch has CUDA and nvcc is found.
                    Architectures from TORCH_CUDA_ARCH_LIST (default "8.0;9.0+PTX": sm80 code
                    also runs on sm86/sm89, sm90 code on H100/H200, and the compute_90 PTX is
                    compiled by the driver for newer GPUs such as sm100/sm120, which would otherwise
                    get "no kernel image"; the kernels need sm80+); MAX_JOBS caps parallel compile jobs, NVCC_THREADS the threads
                    of each nvcc. FASTATTN_CUDA_HEAD_DIMS (e.g. "64,128"; default: all that
                    csrc/cuda/generate_kernels.py writes) builds a subset of the kernels.
The Triton kernels in csrc/triton/ are Python sources shipped as fastattn.triton_kernels.
Build offline and without isolation, against the torch you run with:
    pip install --no-build-isolation .
"""
import glob
import os
import re
import shutil
import subprocess
import sys

from setuptools import setup

from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.abspath(__file__))


def rel(pattern):
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


def openmp_flags():
    if sys.platform == "darwin":  # Apple clang: OpenMP through libomp, if present
        return ["-Xpreprocessor", "-fopenmp"], ["-lomp"]
    return ["-fopenmp"], ["-fopenmp"]


SANITIZERS = ("address", "undefined")


def sanitizer_flags():
    """Compile and link flags for FASTATTN_SANITIZE (e.g. "address,undefined"); none when it is unset.

    A sanitized build is for tests only: every sanitizer error aborts (no recovery), and the Python
    process must load the runtime first (LD_PRELOAD=$(cc -print-file-name=libasan.so), see .ci/run).
    """
    wanted = [x.strip() for x in os.environ.get("FASTATTN_SANITIZE", "").replace(";", ",").split(",") if x.strip()]
    unknown = [x for x in wanted if x not in SANITIZERS]
    if unknown:
        raise RuntimeError(f"FASTATTN_SANITIZE={os.environ['FASTATTN_SANITIZE']!r}: unknown sanitizer(s) {unknown}; "
                           f"expected a comma-separated subset of {list(SANITIZERS)}")
    if not wanted:
        return [], []
    flags = [f"-fsanitize={','.join(wanted)}", "-fno-sanitize-recover=all", "-fno-omit-frame-pointer", "-g"]
    return flags + ["-DFASTATTN_SANITIZE"], flags


def cpu_extension():
    omp_compile, omp_link = openmp_flags()
    san_compile, san_link = sanitizer_flags()
    # -O1 under the sanitizers: their reports stay readable and the instrumented build several times faster
    optimize = "-O1" if san_compile else "-O3"
    return cpp_extension.CppExtension(
        name="fastattn._C",
        sources=["csrc/ops.cpp"] + rel("csrc/cpu/*.cpp"),
        include_dirs=[os.path.join(ROOT, "csrc")],
        extra_compile_args={"cxx": [optimize, *omp_compile, *san_compile]},  # -std: torch's own (c++20 since 2.10)
        extra_link_args=omp_link + san_link,
    )


def cuda_wheel_include_dirs():
    """CUDA library headers that pip-installed CUDA wheels keep under site-packages/nvidia/*/include."""
    import site

    dirs = []
    for base in site.getsitepackages() + [site.getusersitepackages()]:
        dirs += glob.glob(os.path.join(base, "nvidia", "*", "include"))
    return sorted(set(dirs))


def nvcc_toolkit_dirs(nvcc):
    """The CUDA toolkit's include and library dirs as nvcc itself reports them (nvcc --dryrun).

    CUDA_HOME may be the prefix of an nvcc wrapper script (e.g. /usr/local for
    /usr/local/bin/nvcc) whose include/ and lib64/ hold no CUDA files; the host
    compiler still needs the toolkit's headers (crt/host_defines.h) and the linker libcudart.
    """
    try:
        report = subprocess.run([nvcc, "--dryrun", "-c", "-x", "cu", os.devnull, "-o", os.devnull],
                                capture_output=True, text=True, timeout=120).stderr
    except (OSError, subprocess.SubprocessError):
        return [], []
    includes, libraries = [], []
    for line in report.splitlines():
        if "INCLUDES=" in line:
            includes += re.findall(r'-I"?([^"\s]+)', line) + re.findall(r'"-isystem" "([^"]+)"', line)
        elif "LIBRARIES=" in line:
            libraries += [d for d in re.findall(r'-L"?([^"\s]+)', line) if not d.rstrip("/").endswith("stubs")]

    def existing(dirs):
        return [d for d in dict.fromkeys(os.path.normpath(d) for d in dirs) if os.path.isdir(d)]

    return existing(includes), existing(libraries)


DEFAULT_CUDA_ARCH_LIST = "8.0;9.0+PTX"


def cuda_extension():
    """The CUDA extension per FASTATTN_CUDA, or None when it is not built."""
    import torch

    switch = os.environ.get("FASTATTN_CUDA", "").strip()
    sources = rel("csrc/cuda/*.cu")
    has_torch_cuda = torch.version.cuda is not None
    nvcc = cpp_extension.CUDA_HOME and shutil.which(os.path.join(cpp_extension.CUDA_HOME, "bin", "nvcc"))
    if switch == "0":
        return None
    if switch == "1" and not (has_torch_cuda and nvcc):
        raise RuntimeError(
            "FASTATTN_CUDA=1 but the CUDA extension cannot be built: "
            f"torch.version.cuda={torch.version.cuda!r}, nvcc={'found' if nvcc else 'not found (set CUDA_HOME)'}"
        )
    if not (has_torch_cuda and nvcc):
        return None
    if not sources:
        print("fastattn: no CUDA kernels in csrc/cuda yet; building the CPU extension only", file=sys.stderr)
        return None
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_CUDA_ARCH_LIST)
    sources, head_dims = cuda_kernel_sources(sources)
    toolkit_includes, toolkit_libraries = nvcc_toolkit_dirs(nvcc)
    defines = [f"-DFASTATTN_CUDA_HDIM{d}" for d in head_dims]  # which head dims attention_cuda.cpp dispatches
    # the arch list, for fastattn.info and the "no kernel image" message (no ';' or spaces: a shell reads
    # it). Host compiler only: nvcc would split the value at its commas (its option lists).
    arch_list = re.sub(r"[;\s]+", ",", os.environ["TORCH_CUDA_ARCH_LIST"].strip())
    host_defines = [f"-DFASTATTN_CUDA_ARCH_LIST={arch_list}"] if re.fullmatch(r"[0-9A-Za-z.+,]*", arch_list) else []
    nvcc_threads = os.environ.get("NVCC_THREADS", "").strip()
    nvcc_flags = ["-O3", "--use_fast_math", *defines]
    if nvcc_threads:
        nvcc_flags += ["--threads", nvcc_threads]
    return cpp_extension.CUDAExtension(
        name="fastattn._C_cuda",
        sources=sources + rel("csrc/cuda/*.cpp"),
        # toolkit headers first; the CUDA wheels' only fill in what the toolkit lacks (cuBLAS, cuSPARSE...)
        include_dirs=[os.path.join(ROOT, "csrc")] + toolkit_includes + cuda_wheel_include_dirs(),
        library_dirs=toolkit_libraries,
        extra_compile_args={"cxx": ["-O3", *defines, *host_defines], "nvcc": nvcc_flags},
    )


def cuda_kernel_sources(sources):
    """The .cu files to build and their head dims, per FASTATTN_CUDA_HEAD_DIMS (default: all)."""
    def head_dim(path):
        m = re.search(r"_hdim(\d+)_", os.path.basename(path))
        return int(m.group(1)) if m else None

    available = sorted({head_dim(s) for s in sources} - {None})
    wanted = os.environ.get("FASTATTN_CUDA_HEAD_DIMS", "").strip()
    if wanted:
        try:
            chosen = sorted({int(x) for x in wanted.replace(";", ",").split(",") if x.strip()})
        except ValueError:
            raise RuntimeError(f"FASTATTN_CUDA_HEAD_DIMS={wanted!r}: expected comma-separated integers") from None
        missing = [d for d in chosen if d not in available]
        if missing or not chosen:
            raise RuntimeError(f"FASTATTN_CUDA_HEAD_DIMS={wanted!r}: head dims {missing or chosen} have no kernels; "
                               f"available: {available}")
    else:
        chosen = available
    kept = [s for s in sources if head_dim(s) is None or head_dim(s) in chosen]
    return kept, chosen


ext_modules = [cpu_extension()]
cuda_ext = cuda_extension()
if cuda_ext is not None:
    ext_modules.append(cuda_ext)

setup(
    ext_modules=ext_modules,
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
)
