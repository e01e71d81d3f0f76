"""The results of ``run_gpu_checks.sh``: every part's log read into numbers, one summary.json and a table.

    python tests/gpu/results.py WORK OUT

WORK holds ``parts.tsv`` (one row a part: name, exit status or ``skipped``, seconds, limit, note) and each
part's ``NAME.log`` (``tests.xml`` for the tests); OUT gets ``summary.json``. A part is ``ok`` when it exited
0 and its log holds what it must: pytest's counts with no failure, pretrain_dit.py's last iteration with a
finite loss, a benchmark's JSON line. Exit status 0 when every part is ok or skipped, else 1.
Standard library only: it runs on the GPU machine's python before anything is installed.
"""

from __future__ import annotations

import json
import math
import re
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

TIMEOUT_STATUSES = {"124", "137"}  # timeout(1)'s own, and SIGKILL after its grace period
TRAIN_FIELDS = {  # pretrain_dit.py's log line (dit/training/metrics.py): field -> pattern of its value
    "iteration": r"iteration\s+(\d+)/",
    "ms_per_iteration": r"elapsed time per iteration \(ms\): ([\d.]+)",
    "loss": r"loss \(\w+\): (\S+)",
    "grad_norm": r"grad norm: (\S+)",
    "tokens_per_s": r"tokens/s: ([\d.]+)",
    "tflops_per_gpu": r"TFLOP/s per GPU: ([\d.]+)",
    "mfu_percent": r"MFU: ([\d.]+)%",
    "packing_efficiency": r"packing: ([\d.]+)",
    "memory_gib": r"memory: ([\d.]+) GiB",
}


def tests_result(xml: Path) -> tuple[dict, str | None]:
    if not xml.is_file():
        return {}, "pytest wrote no report"
    suite = ET.parse(xml).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    failed = [
        f"{case.get('classname')}.{case.get('name')}: {(bad.get('message') or '').splitlines()[0][:200]}"
        for case in suite.iter("testcase")
        for bad in case
        if bad.tag in ("failure", "error")
    ]
    skipped = sorted({(s.get("message") or "")[:160] for s in suite.iter("skipped")})
    result = {
        **counts,
        "passed": counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"],
        "failed": failed,
        "skip_reasons": skipped,
    }
    return result, ("a test failed" if failed else None)


def train_result(log: str, iterations: int) -> tuple[dict, str | None]:
    lines = [line for line in log.splitlines() if " iteration " in line and "consumed packs" in line]
    if not lines:
        return {}, "no iteration was logged"
    rows = []
    for line in lines:
        row = {}
        for name, pattern in TRAIN_FIELDS.items():
            m = re.search(pattern, line)
            row[name] = float(m.group(1)) if m else None
        rows.append(row)
    last = rows[-1]
    result = {"logged": rows, "last": last, "losses": [r["loss"] for r in rows]}
    if last["iteration"] != iterations:
        return result, f"stopped at iteration {last['iteration']:.0f} of {iterations}"
    if last["loss"] is None or not math.isfinite(last["loss"]):
        return result, f"loss {last['loss']}"
    return result, None


def resume_result(log: str, iterations: int, train: dict) -> tuple[dict, str | None]:
    """The resumed run as a training run, and how far its losses are from the first run's at the same
    iterations (0 where the GPU's kernels are deterministic)."""
    result, why = train_result(log, iterations)
    first = {r["iteration"]: r["loss"] for r in train.get("logged", [])}
    pairs = [(r["loss"], first[r["iteration"]]) for r in result.get("logged", []) if r["iteration"] in first]
    if why is None and not pairs:
        why = "no iteration logged by both runs"
    if pairs:
        result["max_loss_difference"] = max(abs(a - b) / abs(b) for a, b in pairs)
    return result, why


def te_parallel_result(log: str) -> tuple[dict, str | None]:
    """tests/gpu/te_parallel.py's relative output errors; bf16 runs stay well within 3e-2."""
    lines = [line for line in log.splitlines() if line.startswith('{"te_parallel"')]
    if not lines:
        return {}, "printed no result line"
    errors = json.loads(lines[-1])["te_parallel"]
    worst = max(errors.values())
    return errors, (None if worst < 3e-2 else f"relative error {worst:.3g} (dropped keys?)")


def bench_result(log: str) -> tuple[dict, str | None]:
    lines = [line for line in log.splitlines() if line.startswith("{")]
    if not lines:
        return {}, "printed no JSON line"
    return json.loads(lines[-1]), None


def describe(name: str, result: dict) -> str:
    """The one-line figures of a part for the table."""

    def rate(r: dict | None) -> str:
        if not r:
            return ""
        mfu = f", MFU {r['mfu']:.1%}" if r.get("mfu") is not None else ""
        return f"{r['tokens_per_s']:,.0f} tokens/s, {r['tflops']:.1f} TFLOP/s{mfu}"

    if not result:
        return ""
    if name == "tests":
        return f"{result['passed']} passed, {len(result['failed'])} failed, {result['skipped']} skipped"
    if name == "te_parallel":
        return ", ".join(f"{k} {v:.2e}" for k, v in result.items())
    if name == "train" or name.startswith("train_fp8") or name == "resume":
        last, losses = result["last"], result["losses"]
        resumed = (
            f", largest loss difference from train {result['max_loss_difference']:.2e}"
            if "max_loss_difference" in result
            else ""
        )
        mfu = f", MFU {last['mfu_percent']:.1f}%" if last["mfu_percent"] is not None else ""
        return (
            f"iteration {last['iteration']:.0f}, loss {losses[0]:.4g} -> {losses[-1]:.4g}, "
            f"{last['tokens_per_s']:,.0f} tokens/s, {last['tflops_per_gpu']:.1f} TFLOP/s{mfu}{resumed}"
        )
    if result.get("benchmark") == "bench_step":
        syncs = f"; {result['host_syncs_per_step']} host syncs a step" if "host_syncs_per_step" in result else ""
        if result.get("cuda_sync_warnings_per_step") is not None:
            syncs += f" ({result['cuda_sync_warnings_per_step']} CUDA sync warnings)"
        return f"recipe {rate(result['recipe'])}; overhead {result['overhead_ratio']:.3f}{syncs}"
    if result.get("benchmark") == "bench_model":
        fp8 = f"; fp8 {rate(result['rates']['ours_fp8'])}" if "ours_fp8" in result["rates"] else ""
        return f"ours {rate(result['rates']['ours'])}; / diffusers {result['ratio']:.3f}{fp8}"
    return ""


def read_part(work: Path, name: str, status: str, note: str, done: dict) -> tuple[dict, str | None]:
    """(result, why it is not ok) of a part that ran; ``done``: the results of the parts before it."""
    log_path = work / f"{name}.log"
    log = log_path.read_text(errors="replace") if log_path.is_file() else ""
    if status != "0":
        why = "timed out" if status in TIMEOUT_STATUSES else f"exit status {status}"
        return {"log_tail": log.splitlines()[-40:]}, why
    if name == "tests":
        return tests_result(work / "tests.xml")
    if name in ("train", "train_fsdp") or name.startswith("train_fp8"):
        return train_result(log, int(note))
    if name == "resume":
        return resume_result(log, int(note), done.get("train", {}))
    if name == "te_parallel":
        return te_parallel_result(log)
    if name.startswith("bench_"):
        return bench_result(log)
    return {}, None


def main(work: Path, out: Path) -> int:
    parts, done = [], {}
    for row in (work / "parts.tsv").read_text().splitlines():
        name, status, seconds, limit, note = row.split("\t")
        if status == "skipped":
            parts.append({"part": name, "status": "skipped", "why": note, "seconds": 0})
            continue
        result, why = read_part(work, name, status, note, done)
        done[name] = result
        state = "ok" if why is None else ("timeout" if status in TIMEOUT_STATUSES else "failed")
        parts.append(
            {
                "part": name,
                "status": state,
                "why": why,
                "seconds": int(seconds),
                "limit_s": int(limit),
                "result": result,
            }
        )
    ok = all(p["status"] in ("ok", "skipped") for p in parts)
    (out / "summary.json").write_text(json.dumps({"ok": ok, "parts": parts}, indent=1))
    width = max(len(p["part"]) for p in parts)
    print(f"\n{'part':<{width}}  status   time  result")
    for p in parts:
        figures = p["why"] if p["status"] != "ok" else describe(p["part"], p["result"])
        print(f"{p['part']:<{width}}  {p['status']:<7}  {p['seconds']:>3} s  {figures}")
    print(f"{'all ok' if ok else 'NOT ALL OK'}: {out / 'summary.json'}, logs in {out / 'logs.txt'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]), Path(sys.argv[2])))
