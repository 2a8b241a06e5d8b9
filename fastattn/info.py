"""``python -m fastattn.info``: versions, built extensions, and what each backend supports."""
from __future__ import annotations

import platform
import sys

import torch


def _triton_state() -> str:
    from fastattn import triton_kernels

    reason = triton_kernels.unavailable_reason()
    if reason is not None:
        return f"unavailable ({reason})"
    from fastattn.triton_kernels import autotune  # imports triton: only once we know it is there
    if triton_kernels.interpreting():
        return "interpreter (TRITON_INTERPRET=1): CPU tensors, one fixed block size, slow; for tests"
    return (f"cuda, autotuned ({len(autotune.FWD_SPACE)} fwd / {len(autotune.BWD_DKDV_SPACE)} dK,dV / "
            f"{len(autotune.BWD_DQ_SPACE)} dQ configs); fp32 matmuls exact unless "
            f"torch.set_float32_matmul_precision('high') allows TF32 (now: {torch.get_float32_matmul_precision()})")


CUDA_GENERATED_HEAD_DIMS = (32, 64, 96, 128)  # csrc/cuda/generate_kernels.py

# What each backend has been checked on (the project's own record; a GPU run updates it).
VERIFIED = {
    "cpu": "tested on x86-64 CPUs (CI: 2-core AMD EPYC; the AVX-512 and AMX paths on a 2-core Xeon), boundary sweep, "
           "ASan/UBSan; benchmarked there",
    "triton": "tested in Triton's CPU interpreter, compiled for sm_90; not yet run on a GPU",
    "cuda": "run on the CPU in a device emulation (tests/test_cuda_emulation.py), compiled and linked for "
            "sm80/sm90 + PTX, resource-checked (cuobjdump); not yet run on a GPU",
    "reference": "plain PyTorch (autograd); the float64 reference of every test",
}


def collect() -> dict:
    import fastattn
    from fastattn import _ops, dispatch

    try:
        import triton

        triton_version = triton.__version__
    except (ImportError, AttributeError):  # absent, or blocked by sys.modules["triton"] = None
        triton_version = None
    info = {
        "fastattn": fastattn.__version__,
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": triton_version,
        "platform": platform.platform(),
        "cuda_device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "extensions": {
            "cpu (fastattn._C)": "built" if _ops._C is not None else f"missing ({_ops._C_IMPORT_ERROR})",
            "cuda (fastattn._C_cuda)": (f"built: head dims {list(_ops._C_cuda.head_dims)}, fp16/bf16, sm80+, "
                                        f"bool key-padding masks; archs {getattr(_ops._C_cuda, 'arch_list', '?')}"
                                        if _ops._C_cuda is not None else
                                        "not built (FASTATTN_CUDA=1 with a CUDA torch and nvcc)"),
            "triton kernels": _triton_state(),
        },
        "cpu_simd": _ops._C.cpu_simd() if _ops._C is not None else None,
        "openmp": bool(_ops._C.openmp) if _ops._C is not None else None,
        "threads": torch.get_num_threads(),
        "available_backends": dispatch.available_backends(),
        "capabilities": {name: cap for name, cap in dispatch.CAPABILITIES.items()},
    }
    return info


def main() -> None:
    from fastattn import dispatch

    info = collect()
    for key in ("fastattn", "python", "torch", "torch_cuda", "triton", "platform", "cuda_device"):
        print(f"{key:>12}: {info[key]}")
    print("  extensions:")
    for name, state in info["extensions"].items():
        print(f"    {name:<26} {state}")
    print(f"{'cpu simd':>12}: {info['cpu_simd']}  (OpenMP: {info['openmp']}, threads: {info['threads']})")
    print(f"{'backends':>12}: {', '.join(info['available_backends'])}  (auto picks the first that supports a call)")
    print("  support:")
    for name, cap in info["capabilities"].items():
        dtypes = ", ".join(str(d).replace("torch.", "") for d in cap.dtypes)
        head = "any" if cap.max_head_dim is None else f"<= {cap.max_head_dim}"
        feats = [f for f in ("masks", "dropout", "varlen") if getattr(cap, f)]
        if name == "cuda":  # what its kernels take, beyond the generic table (dispatch._cuda_unsupported)
            built = dispatch.cuda_head_dims()
            head = "/".join(map(str, built or CUDA_GENERATED_HEAD_DIMS)) + ("" if built else " (when built)")
            feats = ["bool key-padding masks only", "dropout", "varlen", "Dv == D", "sm80+"]
        mem = "O(N) memory" if cap.fused else "O(N^2) memory"
        variants = ", ".join(v for v in dispatch.VARIANTS if v in cap.variants) or "none yet"
        print(f"    {name:<10} devices={'/'.join(dispatch.backend_devices(name))}  dtypes={dtypes}  head_dim={head}  "
              f"{', '.join(feats)}, causal, GQA; {mem}; variants: {variants}")
        if name in VERIFIED:
            print(f"    {'':<10} verified: {VERIFIED[name]}")


if __name__ == "__main__":
    main()
