"""Resource usage of every compiled CUDA kernel, read from the built extension.

    python csrc/cuda/resource_check.py [path/to/_C_cuda.so]   (default: the installed fastattn._C_cuda)

For each cubin in the extension's fatbin (one per arch of TORCH_CUDA_ARCH_LIST) and each
kernel in it, cuobjdump --dump-resource-usage gives registers, stack, local memory and
static shared memory. Checked, failing with a list of offenders:
  * no stack frame and no local memory (spills or arrays indexed at run time): STACK = LOCAL = 0;
  * registers <= 255 (the sm80+ limit per thread);
  * no static shared memory of our own: the kernels take all of theirs dynamically, so the
    dynamic size, which tests/test_cuda_emulation.py checks against every GPU's opt-in limit
    (sm80 163 KB, sm86/sm89/sm120 99 KB, sm90 227 KB) as the driver does at launch, is the
    whole budget. (sm_90 cubins list 1 KB per kernel: the block's system-reserved shared
    memory, which the 227 KB opt-in limit already leaves out.)
sm86 and sm89 run the sm_80 cubin (same major version) and sm100/sm120 the compute_90 PTX,
so the sm_80 and sm_90 cubins are all the SASS there is to check.
Exit status 0 when every kernel passes, 1 otherwise, 2 when there is nothing to check.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass

MAX_REGISTERS = 255
RESERVED_SHARED = {"sm_90": 1024}  # system-reserved shared memory cuobjdump reports per kernel
# Known and not fixed yet, listed so that anything new or bigger fails: (arch, kernel name
# pattern) -> stack bytes allowed. Empty: every kernel compiles without stack or spills.
KNOWN_STACK: dict = {}


@dataclass
class KernelUsage:
    arch: str
    name: str
    registers: int
    stack: int
    local: int
    shared: int

    def known_stack(self, name: str) -> int:
        return max([b for (arch, pattern), b in KNOWN_STACK.items() if arch == self.arch and re.search(pattern, name)],
                   default=0)

    def problems(self, name: str = "") -> list:
        found = []
        if self.local or self.stack > self.known_stack(name or self.name):
            found.append(f"stack {self.stack} B / local {self.local} B (spills or a runtime-indexed array)")
        if self.registers > MAX_REGISTERS:
            found.append(f"{self.registers} registers > {MAX_REGISTERS}")
        if self.shared > RESERVED_SHARED.get(self.arch, 0):
            found.append(f"{self.shared} B of static shared memory (the budget assumes dynamic only)")
        return found


def find_cuobjdump() -> str | None:
    """cuobjdump of the CUDA toolkit, on PATH, or the copy triton bundles."""
    candidates = []
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"
    candidates.append(os.path.join(cuda_home, "bin", "cuobjdump"))
    candidates.append(shutil.which("cuobjdump") or "")
    try:
        import triton

        candidates.append(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump"))
    except ImportError:
        pass
    return next((c for c in candidates if c and os.access(c, os.X_OK)), None)


def parse_resource_usage(text: str) -> list:
    """KernelUsage rows from cuobjdump --dump-resource-usage output."""
    rows, arch, name = [], None, None
    for line in text.splitlines():
        line = line.strip()
        if m := re.match(r"arch = (sm_\d+\w*)", line):
            arch = m.group(1)
        elif m := re.match(r"Function (\S+):", line):
            name = m.group(1)
        elif line.startswith("REG:") and name is not None:
            fields = dict(re.findall(r"(\w+(?:\[\d+\])?):(\d+)", line))
            rows.append(KernelUsage(arch or "?", name, int(fields.get("REG", 0)), int(fields.get("STACK", 0)),
                                    int(fields.get("LOCAL", 0)), int(fields.get("SHARED", 0))))
            name = None
    return rows


def kernel_usage(library: str, cuobjdump: str) -> list:
    out = subprocess.run([cuobjdump, "--dump-resource-usage", library], capture_output=True, text=True, check=True)
    return parse_resource_usage(out.stdout)


def demangled(names) -> dict:
    cxxfilt = shutil.which("c++filt")
    if not cxxfilt:
        return {n: n for n in names}
    out = subprocess.run([cxxfilt], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()
    return dict(zip(names, out)) if len(out) == len(names) else {n: n for n in names}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv:
        library = argv[0]
    else:
        from fastattn import _ops

        if _ops._C_cuda is None:
            print("resource_check: fastattn._C_cuda is not built", file=sys.stderr)
            return 2
        library = _ops._C_cuda.__file__
    cuobjdump = find_cuobjdump()
    if cuobjdump is None:
        print("resource_check: no cuobjdump (CUDA toolkit, PATH or triton's bundled copy)", file=sys.stderr)
        return 2
    rows = kernel_usage(library, cuobjdump)
    if not rows:
        print(f"resource_check: no kernels found in {library}", file=sys.stderr)
        return 2
    names = demangled(sorted({r.name for r in rows}))
    bad = 0
    for r in sorted(rows, key=lambda r: (r.arch, names[r.name])):
        problems = r.problems(names[r.name])
        bad += bool(problems)
        status = "FAIL " + "; ".join(problems) if problems else ("known spill (KNOWN_STACK)" if r.stack else "ok")
        print(f"{r.arch:7} regs {r.registers:3}  stack {r.stack:4}  local {r.local:4}  shared {r.shared:6}  "
              f"{names[r.name][:110]}  {status}")
    archs = sorted({r.arch for r in rows})
    print(f"resource_check: {len(rows)} kernels in {len(archs)} cubins ({', '.join(archs)}), {bad} failing")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
