"""Extra peak memory of one call: how much memory it needs above its inputs.

GPU: in this process, ``torch.cuda.max_memory_allocated()`` after a reset, minus
``memory_allocated()`` with the inputs in place (the caching allocator counts tensors, not pages).

CPU: every (candidate, case, mode) runs in a fresh process, so no allocator state of an
earlier call leaks into the figure. The processes are forked from a forkserver that has
only imported torch and fastattn (starting one costs milliseconds, not the 3 s of
``import torch``); each one
  1. fixes glibc's mmap threshold, so freed large buffers go back to the OS at once
     (otherwise glibc's dynamic threshold keeps them and hides later peaks),
  2. warms the candidate up on a tiny input (code pages, OpenMP threads, one-time buffers),
  3. allocates the case's inputs, then resets the kernel's peak-RSS mark
     (``/proc/self/clear_refs``, Linux) and reads VmRSS as the baseline,
  4. runs one call (forward, or forward + backward) and reads VmHWM.
extra peak = VmHWM - baseline. The outputs (and gradients) the call returns are part of
it; they are the same size for every candidate. Where the peak mark cannot be reset
(not Linux), the fallback is ``ru_maxrss`` after minus before, which can only
under-estimate (an earlier transient peak hides part of the call's).
"""
from __future__ import annotations

import gc
import multiprocessing as mp
import resource
import sys
from dataclasses import dataclass, replace
from typing import Optional

import torch

from . import core

M_TRIM_THRESHOLD = -1  # glibc mallopt parameters (malloc.h)
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 128 * 1024  # glibc's default, now fixed instead of dynamic
JOB_TIMEOUT_S = 1800
EXACT_METHODS = ("VmHWM after reset", "cuda max_memory_allocated")


@dataclass(frozen=True)
class MemoryJob:
    candidate: str  # Candidate.name
    case: core.Case
    mode: str  # "fwd" (no_grad) or "fwd_bwd" (one training step); "bwd" rows share fwd_bwd's
    device: str = "cpu"
    threads: int = 0  # torch intra-op threads in the child; 0 = torch's default


# ---------------------------------------------------------------------------
# Reading the process's memory
# ---------------------------------------------------------------------------
def _status_kib(field: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak_rss() -> bool:
    """Set VmHWM to the current VmRSS (Linux >= 4.0); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _ru_maxrss_bytes() -> int:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024  # bytes on macOS, KiB on Linux


def _fix_malloc_thresholds() -> None:
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)
        libc.mallopt(M_TRIM_THRESHOLD, MMAP_THRESHOLD_BYTES)
    except (OSError, AttributeError):
        pass  # not glibc


def _run(p: core.Prepared, mode: str):
    return core.run_forward(p) if mode == "fwd" else core.run_train_step(p)


def _tiny(case: core.Case) -> core.Case:
    group = case.heads // case.hkv
    return replace(case, batch=1, heads=group, kv_heads=1 if group > 1 else 0, seqlen=64)


def measure_in_this_process(job: MemoryJob) -> dict:
    """Extra peak bytes of one call of ``job`` in the calling process (see the module docstring)."""
    device = torch.device(job.device)
    cand = core.get_candidate(job.candidate, device)
    tiny = _tiny(job.case)
    _run(cand.prepare(tiny, core.make_inputs(tiny, device)), job.mode)  # warm-up
    inputs = core.make_inputs(job.case, device)
    p = cand.prepare(job.case, inputs)
    gc.collect()
    return peak_of_call(lambda: _run(p, job.mode), device)


def peak_of_call(fn, device: torch.device) -> dict:
    """Extra peak bytes of ``fn()`` above what the process holds before it (see the module docstring)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        result = fn()
        torch.cuda.synchronize(device)
        extra, method = torch.cuda.max_memory_allocated(device) - base, "cuda max_memory_allocated"
    elif _reset_peak_rss() and _status_kib("VmRSS") is not None:
        base = _status_kib("VmRSS")
        result = fn()
        extra, method = (_status_kib("VmHWM") - base) * 1024, "VmHWM after reset"
    else:
        base = _ru_maxrss_bytes()
        result = fn()
        extra, method = _ru_maxrss_bytes() - base, "ru_maxrss delta (lower bound)"
    del result
    return {"extra_peak_bytes": max(0, int(extra)), "method": method, "error": None}


def _child(conn, job, measure_fn=None) -> None:
    try:
        _fix_malloc_thresholds()
        if job.threads:
            torch.set_num_threads(job.threads)
        conn.send((measure_fn or measure_in_this_process)(job))
    except BaseException as e:  # report, do not hang the parent
        conn.send({"extra_peak_bytes": None, "method": None, "error": f"{type(e).__name__}: {e}".splitlines()[0]})
    finally:
        conn.close()


_CONTEXT = None


def _context():
    """forkserver where there is one (cheap fresh processes), else spawn."""
    global _CONTEXT
    if _CONTEXT is None:
        if "forkserver" in mp.get_all_start_methods():
            _CONTEXT = mp.get_context("forkserver")
            # torch and fastattn, imported once; symbolic_shapes (sympy) is what autograd's first
            # backward imports lazily (0.6 s): a plain import, safe to do before forking
            _CONTEXT.set_forkserver_preload(["benchmarks.memory", "torch.fx.experimental.symbolic_shapes"])
        else:
            _CONTEXT = mp.get_context("spawn")
    return _CONTEXT


def measure_in_subprocess(job, timeout_s: float = JOB_TIMEOUT_S, measure_fn=None) -> dict:
    """``measure_fn(job)`` (default: measure_in_this_process) in a fresh process; both must be picklable
    (a module-level function and a dataclass)."""
    ctx = _context()
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(child, job, measure_fn), daemon=True)
    proc.start()
    child.close()
    result, timed_out = None, False
    try:
        if parent.poll(timeout_s):
            result = parent.recv()
        else:
            timed_out = True
    except EOFError:  # the child died before sending
        pass
    proc.join(timeout=60)
    if proc.is_alive():
        proc.kill()  # our own child, by handle
        proc.join()
    if result is None:
        if timed_out:
            error = f"memory subprocess timed out after {timeout_s:.0f} s"
        else:
            hint = " (killed: out of memory?)" if proc.exitcode == -9 else ""
            error = f"memory subprocess died, exit code {proc.exitcode}{hint}"
        result = {"extra_peak_bytes": None, "method": None, "error": error}
    return result


def measure(job: MemoryJob) -> dict:
    """Extra peak bytes of one call: in this process on GPU, in a fresh subprocess on CPU."""
    return measure_job(measure_in_this_process, job, torch.device(job.device))


def measure_job(measure_fn, job, device: torch.device) -> dict:
    """``measure_fn(job)`` -> peak dict: in this process on GPU, in a fresh subprocess on CPU."""
    if device.type == "cuda":
        try:
            return measure_fn(job)
        except torch.cuda.OutOfMemoryError as e:
            torch.cuda.empty_cache()
            return {"extra_peak_bytes": None, "method": None, "error": f"OOM: {str(e).splitlines()[0]}"}
    return measure_in_subprocess(job, measure_fn=measure_fn)


def threads_for_children() -> int:
    """The parent's torch thread count, so children measure the same per-thread buffers."""
    return torch.get_num_threads()
