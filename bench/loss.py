"""Benchmark: our chunked generalized JSD against TRL's, forward + backward, fp32 on CPU.

    python -m bench.loss                      # N=2048 tokens, V=151936 (Qwen2 vocabulary)
    python -m bench.loss --n 256 --v 32000    # a quick run

Every measurement runs in a fresh subprocess (`--worker ours|trl|copy`) so that one
implementation's freed memory or allocator state cannot flatter the other. TRL's needs ~17 [N, V]
fp32 tensors with its inputs (21 GB at full size): it runs at the largest N (halving) that fits in
80% of MemAvailable, and then ours is rerun at that N too, so the ratios always compare equal N.

Memory method: the worker allocates the inputs (student logits with requires_grad, teacher logits,
labels with no ignored position, as GKD training always passes labels), then resets the kernel's
peak-RSS counter (`echo 5 > /proc/self/clear_refs`) and reads VmRSS as the baseline; after the
first forward+backward it reads VmHWM (peak RSS since the reset). Extra peak = VmHWM - baseline:
everything the loss and its backward allocate, including the [N, V] gradient both must produce.
Large torch CPU tensors are mmap'd and returned to the OS when freed, so RSS follows live tensors.
If clear_refs is not writable the worker falls back to ru_maxrss (peak over the whole process),
which can only overstate the extra.

Time: median wall time of `--reps` forward+backward passes after that first one.
Effective bandwidth: bytes the loss cannot avoid touching (read student + teacher logits, write
the gradient: 3 * N * V * 4 bytes) / median time, next to the copy bandwidth of this machine
(read+write bytes / time of a 1 GiB `Tensor.copy_`, median of 5) measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

OUT = Path(__file__).resolve().parent / "out" / "loss.json"
GiB = 1 << 30


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _loss_fn(impl: str):
    if impl == "ours":
        from learner.loss import generalized_jsd_loss

        return generalized_jsd_loss
    try:
        from trl.experimental.gkd import GKDTrainer
    except ImportError:
        from trl.trainer.gkd_trainer import GKDTrainer
    return GKDTrainer.generalized_jsd_loss


def _worker_loss(impl: str, n: int, v: int, reps: int, beta: float) -> dict:
    import torch

    fn = _loss_fn(impl)
    gen = torch.Generator().manual_seed(0)
    student = (torch.randn(1, n, v, generator=gen) * 3).requires_grad_(True)
    teacher = torch.randn(1, n, v, generator=gen) * 3
    labels = torch.zeros(1, n, dtype=torch.long)  # GKD always passes labels; none ignored here
    reset_ok = _reset_peak()
    base_kib = _status_kib("VmRSS")
    times, value = [], None
    for rep in range(reps + 1):
        student.grad = None
        start = time.perf_counter()
        loss = fn(student, teacher, labels=labels, beta=beta)
        loss.backward()
        elapsed = time.perf_counter() - start
        if rep == 0:
            peak_kib = (
                _status_kib("VmHWM") if reset_ok else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            )
            value, path = loss.item(), type(loss.grad_fn).__name__
        else:
            times.append(elapsed)
        del loss
    return {
        "impl": impl,
        "n": n,
        "v": v,
        "loss": value,
        "grad_fn": path,
        "grad_checksum": float(student.grad.double().abs().sum()),
        "peak_extra_bytes": (peak_kib - base_kib) * 1024,
        "peak_method": "VmHWM after clear_refs" if reset_ok else "ru_maxrss",
        "median_s": statistics.median(times),
        "times_s": times,
        "threads": torch.get_num_threads(),
    }


def _worker_copy() -> dict:
    import torch

    src = torch.ones(GiB // 4)
    dst = torch.empty_like(src)
    dst.copy_(src)  # fault the pages in before timing
    times = []
    for _ in range(5):
        start = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - start)
    return {
        "copy_bytes": 2 * GiB,
        "copy_median_s": statistics.median(times),
        "copy_gbps": 2 * GiB / statistics.median(times) / 1e9,
    }


def _spawn(args: list[str]) -> dict | None:
    """Run one worker in a fresh interpreter; None if it died (e.g. killed for memory)."""
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run(
        [sys.executable, "-m", "bench.loss", *args], capture_output=True, text=True, cwd=root
    )
    if proc.returncode != 0:
        print(f"worker {args} exited {proc.returncode}: {proc.stderr.strip()[-500:]}", file=sys.stderr)
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _bench(impl: str, n: int, v: int, reps: int, beta: float) -> dict | None:
    return _spawn(["--worker", impl, "--n", str(n), "--v", str(v), "--reps", str(reps), "--beta", str(beta)])


def _mem_available() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    raise KeyError("MemAvailable")


def _trl_rows(n: int, v: int) -> int:
    """Largest N (halving) at which TRL's ~14 [N, V] temporaries, its gradient and the two inputs
    fit in 80% of the memory available now: an OOM would let the kernel kill someone else's
    process on a shared machine."""
    while n > 1 and 17 * n * v * 4 > 0.8 * _mem_available():
        n //= 2
    return n


def _report(ours: dict, trl: dict | None, ours_same_n: dict | None, copy: dict) -> dict:
    """Ratios ours/TRL at the same N (ours is rerun at TRL's N when TRL had to run smaller)."""
    touched = 3 * ours["n"] * ours["v"] * 4
    report = {
        "ours": ours,
        "trl": trl,
        "ours_at_trl_n": ours_same_n,
        "copy": copy,
        "bytes_touched_ours": touched,
    }
    report["ours_gbps"] = touched / ours["median_s"] / 1e9
    report["ours_fraction_of_copy_bw"] = report["ours_gbps"] / copy["copy_gbps"]
    if trl is not None:
        report["trl_gbps"] = 3 * trl["n"] * trl["v"] * 4 / trl["median_s"] / 1e9
    if trl is not None and ours_same_n is not None:
        report["compared_at_n"] = trl["n"]
        report["memory_ratio"] = ours_same_n["peak_extra_bytes"] / trl["peak_extra_bytes"]
        report["time_ratio"] = ours_same_n["median_s"] / trl["median_s"]
        report["loss_abs_diff"] = abs(ours_same_n["loss"] - trl["loss"])
    return report


def _print(report: dict) -> None:
    for key in ("ours", "ours_at_trl_n", "trl"):
        r = report[key]
        if key == "ours_at_trl_n" and r is report["ours"]:
            continue
        if r is None:
            print(f"{key}: failed")
            continue
        print(
            f"{key:5s} N={r['n']} V={r['v']} ({r['grad_fn']}): loss {r['loss']:.6f}, "
            f"peak extra {r['peak_extra_bytes'] / GiB:.2f} GiB, median fwd+bwd {r['median_s'] * 1e3:.0f} ms"
        )
    copy = report["copy"]
    print(
        f"copy bandwidth {copy['copy_gbps']:.1f} GB/s; ours touches {report['bytes_touched_ours'] / 1e9:.2f} GB "
        f"-> {report['ours_gbps']:.1f} GB/s ({100 * report['ours_fraction_of_copy_bw']:.0f}% of copy); "
        f"TRL, same count of bytes: {report.get('trl_gbps', float('nan')):.1f} GB/s"
    )
    if "memory_ratio" in report:
        print(
            f"ours/TRL at N={report['compared_at_n']}: peak extra memory {report['memory_ratio']:.3f}, "
            f"time {report['time_ratio']:.3f}; |loss diff| {report['loss_abs_diff']:.2e}"
        )


def _markdown(report: dict, beta: float) -> str:
    """The BENCHMARKS.md fragment (bench/out/loss.md): raw figures, then each target beside its ratio."""
    ours, trl, copy = report["ours"], report["trl"], report["copy"]

    def row(name: str, r: dict | None) -> str:
        if r is None:
            return f"| {name} | failed (see the run's stderr) | | | |"
        return f"| {name} | {r['n']} x {r['v']} | {r['loss']:.6f} | {r['peak_extra_bytes'] / GiB:.2f} GiB | {r['median_s'] * 1e3:.0f} ms |"

    md = [
        "## 4. The loss: chunked generalized JSD against TRL's\n",
        f"Forward + backward, fp32, beta {beta}, random logits (std 3), labels on every position; each measurement in a fresh process. "
        f"Extra peak memory = resident high-water mark after the first pass minus resident memory with the inputs allocated "
        f"({ours['peak_method']}); time = median of the timed passes after it, {ours['threads']} threads.\n",
        "| implementation | N x V | loss | extra peak memory | fwd+bwd |",
        "|---|---|---|---|---|",
        row("ours (`learner.loss.generalized_jsd_loss`)", ours),
    ]
    if (
        report.get("ours_at_trl_n") is not None
        and report["ours_at_trl_n"] is not ours
        and report["ours_at_trl_n"] != ours
    ):
        md.append(row("ours, at TRL's N", report["ours_at_trl_n"]))
    md += [row("TRL `GKDTrainer.generalized_jsd_loss`", trl), ""]
    if "memory_ratio" in report:
        mem, tm = report["memory_ratio"], report["time_ratio"]
        at = f"at N={report['compared_at_n']}" + (
            "" if report["compared_at_n"] == ours["n"] else " (TRL's does not fit in memory at the full N)"
        )
        md.append(
            f"- peak extra memory, ours / TRL {at}: **{mem:.3f}** (target <= 0.25): **{'met' if mem <= 0.25 else 'NOT met'}**"
        )
        md.append(
            f"- time, ours / TRL {at}: **{tm:.3f}** (target <= 1.0, no slower): **{'met' if tm <= 1.0 else 'NOT met'}**"
        )
        md.append(f"- |loss difference| at the same inputs: {report['loss_abs_diff']:.2e}")
    else:
        md.append("- ratios: not measured (TRL's run failed; see its stderr)")
    trl_bw = f"; TRL, counting the same bytes: {report['trl_gbps']:.1f} GB/s" if "trl_gbps" in report else ""
    md.append(
        f"- effective bandwidth: ours touches {report['bytes_touched_ours'] / 1e9:.2f} GB (read student + teacher logits, write the gradient) "
        f"-> **{report['ours_gbps']:.1f} GB/s**, {100 * report['ours_fraction_of_copy_bw']:.0f}% of this machine's measured copy bandwidth "
        f"({copy['copy_gbps']:.1f} GB/s read+write, a 1 GiB `Tensor.copy_`: the physical floor for a pass that must read and write every logit){trl_bw}"
    )
    md.append(
        f"- load average at the start: {', '.join(f'{x:.1f}' for x in report.get('load_avg_at_start', []))}"
    )
    return "\n".join(md) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2048, help="tokens (rows of the logits)")
    parser.add_argument("--v", type=int, default=151936, help="vocabulary size")
    parser.add_argument("--reps", type=int, default=3, help="timed repetitions after the first pass")
    parser.add_argument("--beta", type=float, default=0.5)
    parser.add_argument("--worker", choices=["ours", "trl", "copy"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    from bench.common import (
        setup_process,
    )  # same process settings as every other section (OMP_WAIT_POLICY, SIGTERM)

    setup_process()
    if args.worker:
        result = (
            _worker_copy()
            if args.worker == "copy"
            else _worker_loss(args.worker, args.n, args.v, args.reps, args.beta)
        )
        print(json.dumps(result))
        return 0
    load = os.getloadavg()
    ours = _bench("ours", args.n, args.v, args.reps, args.beta)
    if ours is None:
        print("error: our loss failed; see above", file=sys.stderr)
        return 2
    trl_n = _trl_rows(args.n, args.v)
    if trl_n != args.n:
        print(f"not enough free memory for TRL at N={args.n}: running TRL (and ours again) at N={trl_n}")
    trl = _bench("trl", trl_n, args.v, args.reps, args.beta)
    ours_same_n = ours if trl_n == args.n else _bench("ours", trl_n, args.v, args.reps, args.beta)
    copy = _spawn(["--worker", "copy"])
    if copy is None:
        print("error: the copy-bandwidth worker failed; see above", file=sys.stderr)
        return 2
    report = _report(ours, trl, ours_same_n, copy)
    report["load_avg_at_start"] = load
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(report, indent=2))
    OUT.with_suffix(".md").write_text(
        _markdown(report, args.beta)
    )  # the BENCHMARKS.md fragment (bench.run_all)
    _print(report)
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
