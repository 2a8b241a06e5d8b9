"""Run upstream projects' own tests against fastattn: PyTorch's SDPA / MultiheadAttention tests on the
drop-ins, transformers' model tests on ``attn_implementation="fastattn"``.

    python tests/upstream/run.py --pytorch-test-dir /path/to/pytorch/test [--out DIR] [files...]
    python tests/upstream/run.py --transformers-dir /path/to/transformers [--out DIR] [files...]

Runs each upstream file twice in its own pytest process, once on the upstream code as it is (the
baseline: torch's SDPA and module, transformers' ``sdpa``) and once with fastattn swapped in
(``swap_in_fastattn.py`` for PyTorch, ``swap_in_fastattn_hf.py`` for transformers), and compares
the outcomes test by test: a *regression* is a test that passes (or skips) on the baseline and fails
with fastattn. Writes ``results.json`` and ``results.md`` (every regression with its first error line)
to --out.

The upstream files are not vendored (they are those projects' code): point --pytorch-test-dir at the
``test/`` folder of a pytorch checkout, or --transformers-dir at the root of a transformers checkout
(its tests run from there; its ``src/`` goes first on the path when present, so the library and the
tests are the same version). UPSTREAM below pins what the recorded results were run on. CI cannot
fetch them, so this is run by hand; the results live in benchmarks/results/.
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

# What benchmarks/results/upstream-*.md were measured on.
# The only copy of PyTorch's tests reachable from the dev machine was a fork's snapshot of pytorch main
# of 2023-04-13 (version.txt 2.1.0a0); newer files run the same way.
UPSTREAM = {
    "pytorch": {
        "source": "github.com/yakov-helm/pytorch_exp (a pytorch fork) at c5e2a7738220d39b8602869406a76e2787ac5c6b",
        "version": "2.1.0a0 (main of 2023-04-13)",
        "files": ["test_transformers.py", "nn/test_multihead_attention.py"],
        "plugin": "swap_in_fastattn",
        # and a newer nn/test_multihead_attention.py (after pytorch issue 163640, autumn 2025): pytorch/pytorch
        # at 03f76200b7b3eccc1be6d93f2841dcfea04d972e, read file by file (the repository is over the fetch limit)
        "newer_files": {"nn/test_multihead_attention.py": "03f76200b7b3eccc1be6d93f2841dcfea04d972e",
                        # a current test_transformers.py (CausalBias, enable_gqa, zero-sized inputs, compile with
                        # dynamic shapes): github.com/Nik-Reddy/pytorch (a fork of main) at this commit, its CPU
                        # classes (TestTransformers, TestSDPAFailureModes, TestSDPA, TestSDPACpuOnly, TestAttnBias)
                        # transcribed through read_file; the CUDA-, XPU- and @onlyCUDA-only tests left out
                        "test_transformers.py": "1dea6e3d39ae1ea15dbe58437bbd18e0e967ebf3"},
    },
    # transformers main of 2025-12-23 (5.0.0.dev0), the newest copy reachable here: a fork's snapshot
    # (github.com/feisenyu/transformers_4573) whose history holds upstream's commits unchanged up to this one.
    "transformers": {
        "source": "github.com/huggingface/transformers at d6a6c82680cba9c51decdacac6dd6315ea4a766a",
        "version": "5.0.0.dev0 (main of 2025-12-23)",
        "files": ["tests/models/bert/test_modeling_bert.py", "tests/models/llama/test_modeling_llama.py",
                  "tests/models/mistral/test_modeling_mistral.py", "tests/models/qwen2/test_modeling_qwen2.py",
                  "tests/models/gemma2/test_modeling_gemma2.py", "tests/models/gemma3/test_modeling_gemma3.py",
                  "tests/models/gpt_oss/test_modeling_gpt_oss.py"],
        "plugin": "swap_in_fastattn_hf",
    },
}


def run_pytest(test_dir: Path, test_file: str, suite: str, swap: bool, junit: Path, timeout: int) -> dict:
    """One pytest process over one upstream file; returns its seconds and fastattn's attention calls."""
    calls = junit.with_suffix(".calls.json")
    calls.unlink(missing_ok=True)
    paths = [str(HERE)]
    if suite == "transformers" and (test_dir / "src" / "transformers").is_dir():
        paths.insert(0, str(test_dir / "src"))
    env = dict(os.environ, FASTATTN_UPSTREAM_SWAP="1" if swap else "0", FASTATTN_UPSTREAM_CALLS=str(calls),
               PYTHONPATH=os.pathsep.join(paths + [os.environ.get("PYTHONPATH", "")]),
               PYTORCH_PRINT_REPRO_ON_FAILURE="0")
    options = []
    if suite == "transformers":
        options = ["-o", "addopts="]  # its pyproject collects the docs' doctests too
        env["HF_HUB_OFFLINE"] = "1"  # tests that download checkpoints fail at once, in both runs alike
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *options, "-p", UPSTREAM[suite]["plugin"],
           f"--junitxml={junit}", test_file]
    start = time.perf_counter()
    subprocess.run(cmd, cwd=test_dir, env=env, timeout=timeout, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    seconds = time.perf_counter() - start
    fastattn_calls = json.loads(calls.read_text()).get("fastattn_attention_calls") if calls.exists() else None
    return {"seconds": seconds, "fastattn_attention_calls": fastattn_calls}


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


def compare(baseline: dict, ours: dict) -> dict:
    counts = {"tests": len(ours)}
    for label, run in (("baseline", baseline), ("fastattn", ours)):
        for outcome in ("passed", "failed", "skipped"):
            counts[f"{label}_{outcome}"] = sum(o == outcome for o, _ in run.values())
    regressions = {name: msg for name, (o, msg) in ours.items()
                   if o == "failed" and baseline.get(name, ("missing", ""))[0] != "failed"}
    fixed = sorted(name for name, (o, _) in ours.items()
                   if o != "failed" and baseline.get(name, ("", ""))[0] == "failed")
    return {"counts": counts, "regressions": regressions, "fixed_vs_baseline": fixed}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--pytorch-test-dir", type=Path, help="the test/ folder of a pytorch checkout")
    where.add_argument("--transformers-dir", type=Path, help="the root of a transformers checkout")
    parser.add_argument("--out", type=Path, default=Path("upstream-results"))
    parser.add_argument("--timeout", type=int, default=7200, help="seconds per pytest process")
    parser.add_argument("files", nargs="*", help="upstream test files (default: the pinned list of the suite)")
    args = parser.parse_args(argv)
    suite = "pytorch" if args.pytorch_test_dir is not None else "transformers"
    test_dir = args.pytorch_test_dir or args.transformers_dir
    files = args.files or UPSTREAM[suite]["files"]
    args.out.mkdir(parents=True, exist_ok=True)
    import torch

    report = {"suite": suite, "torch": torch.__version__, "test_dir": str(test_dir), "files": {}}
    for test_file in files:
        stem = test_file.replace("/", "_").removesuffix(".py")
        runs, runs_info = {}, {}
        for label, swap in (("baseline", False), ("fastattn", True)):
            junit = args.out / f"{stem}.{label}.xml"
            runs_info[label] = run_pytest(test_dir, test_file, suite, swap, junit, args.timeout)
            runs[label] = outcomes(junit)
            print(f"{test_file} [{label}]: {len(runs[label])} tests in {runs_info[label]['seconds']:.0f} s",
                  flush=True)
        report["files"][test_file] = compare(runs["baseline"], runs["fastattn"])
        report["files"][test_file]["fastattn_attention_calls"] = runs_info["fastattn"]["fastattn_attention_calls"]
    (args.out / "results.json").write_text(json.dumps(report, indent=1, sort_keys=True))
    baseline = "torch" if suite == "pytorch" else "sdpa"
    lines = [f"# {suite}'s tests against fastattn (torch {report['torch']})", ""]
    for test_file, result in report["files"].items():
        c = result["counts"]
        calls = result["fastattn_attention_calls"]
        lines += [f"## {test_file}", "",
                  f"{c['tests']} tests: {baseline} {c['baseline_passed']} passed / {c['baseline_failed']} failed / "
                  f"{c['baseline_skipped']} skipped; fastattn {c['fastattn_passed']} passed / {c['fastattn_failed']} "
                  f"failed / {c['fastattn_skipped']} skipped; **regressions: {len(result['regressions'])}**"
                  + (f"; fastattn's attention ran {calls} times" if calls is not None else ""), ""]
        lines += [f"- `{name}`: {msg}" for name, msg in sorted(result["regressions"].items())]
        lines.append("")
    (args.out / "results.md").write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
