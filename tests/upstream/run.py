"""Run PyTorch's own SDPA / MultiheadAttention tests against fastattn's drop-ins.

    python tests/upstream/run.py --pytorch-test-dir /path/to/pytorch/test [--out DIR] [files...]

Runs each upstream file twice in its own pytest process, once on torch itself (the baseline) and
once with fastattn swapped in (``swap_in_fastattn.py``), and compares the outcomes test by test:
a *regression* is a test that passes (or skips) on torch and fails with fastattn. Writes
``results.json`` and ``results.md`` (every regression with its first error line) to --out.

The upstream files are not vendored (they are PyTorch's code): point --pytorch-test-dir at the
``test/`` folder of a pytorch checkout. UPSTREAM below pins what the recorded results were run on.
CI cannot fetch them, so this is run by hand; the results live in benchmarks/results/.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

HERE = Path(__file__).resolve().parent

# What benchmarks/results/upstream-pytorch-tests-*.md was measured on.
# The only copy of PyTorch's tests reachable from the dev machine was a fork's snapshot of pytorch main
# of 2023-04-13 (version.txt 2.1.0a0); newer files run the same way.
UPSTREAM = {
    "source": "github.com/yakov-helm/pytorch_exp (a pytorch fork) at c5e2a7738220d39b8602869406a76e2787ac5c6b",
    "pytorch_version": "2.1.0a0 (main of 2023-04-13)",
    "files": ["test_transformers.py", "nn/test_multihead_attention.py"],
}


def run_pytest(test_dir: Path, test_file: str, swap: bool, junit: Path, timeout: int) -> float:
    env = dict(os.environ, FASTATTN_UPSTREAM_SWAP="1" if swap else "0",
               PYTHONPATH=os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]),
               PYTORCH_PRINT_REPRO_ON_FAILURE="0")
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "swap_in_fastattn",
           f"--junitxml={junit}", test_file]
    start = time.perf_counter()
    subprocess.run(cmd, cwd=test_dir, env=env, timeout=timeout, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def outcomes(junit: Path) -> dict:
    """{test id: (outcome, first line of the message)} from a junit XML file."""
    result = {}
    for case in ET.parse(junit).getroot().iter("testcase"):
        name = f"{case.get('classname')}::{case.get('name')}"
        outcome, message = "passed", ""
        for child in case:
            if child.tag in ("failure", "error"):
                outcome = "failed"
                message = (child.get("message") or child.text or "").strip().splitlines()[:1]
                message = message[0][:300] if message else ""
                break
            if child.tag == "skipped":
                outcome = "skipped"
        result[name] = (outcome, message)
    return result


def compare(torch_run: dict, ours: dict) -> dict:
    counts = {"tests": len(ours)}
    for label, run in (("torch", torch_run), ("fastattn", ours)):
        for outcome in ("passed", "failed", "skipped"):
            counts[f"{label}_{outcome}"] = sum(o == outcome for o, _ in run.values())
    regressions = {name: msg for name, (o, msg) in ours.items()
                   if o == "failed" and torch_run.get(name, ("missing", ""))[0] != "failed"}
    fixed = sorted(name for name, (o, _) in ours.items()
                   if o != "failed" and torch_run.get(name, ("", ""))[0] == "failed")
    return {"counts": counts, "regressions": regressions, "fixed_vs_torch": fixed}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pytorch-test-dir", type=Path, required=True, help="the test/ folder of a pytorch checkout")
    parser.add_argument("--out", type=Path, default=Path("upstream-results"))
    parser.add_argument("--timeout", type=int, default=7200, help="seconds per pytest process")
    parser.add_argument("files", nargs="*", default=UPSTREAM["files"])
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    import torch

    report = {"torch": torch.__version__, "pytorch_test_dir": str(args.pytorch_test_dir), "files": {}}
    for test_file in args.files:
        stem = test_file.replace("/", "_").removesuffix(".py")
        runs = {}
        for label, swap in (("torch", False), ("fastattn", True)):
            junit = args.out / f"{stem}.{label}.xml"
            seconds = run_pytest(args.pytorch_test_dir, test_file, swap, junit, args.timeout)
            runs[label] = outcomes(junit)
            print(f"{test_file} [{label}]: {len(runs[label])} tests in {seconds:.0f} s", flush=True)
        report["files"][test_file] = compare(runs["torch"], runs["fastattn"])
    (args.out / "results.json").write_text(json.dumps(report, indent=1, sort_keys=True))
    lines = [f"# PyTorch's tests against fastattn's drop-ins (torch {report['torch']})", ""]
    for test_file, result in report["files"].items():
        c = result["counts"]
        lines += [f"## {test_file}", "",
                  f"{c['tests']} tests: torch {c['torch_passed']} passed / {c['torch_failed']} failed / "
                  f"{c['torch_skipped']} skipped; fastattn {c['fastattn_passed']} passed / {c['fastattn_failed']} "
                  f"failed / {c['fastattn_skipped']} skipped; **regressions: {len(result['regressions'])}**", ""]
        lines += [f"- `{name}`: {msg}" for name, msg in sorted(result["regressions"].items())]
        lines.append("")
    (args.out / "results.md").write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
