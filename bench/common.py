"""What every benchmark section shares: paths, the demo models, processes, and how results are written.

A section writes `bench/out/<name>.json` (raw figures, everything measured) and `bench/out/<name>.md`
(the fragment BENCHMARKS.md shows). Targets are stated next to the measured ratio with `target_line`,
met or not, so no section can quietly drop one.

Heavy imports (torch, transformers) stay inside the functions that need them.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "out"
PLOTS = ROOT / "bench" / "plots"
DEMO = ROOT / "demo-output"


def setup_process() -> None:
    """Call first in every benchmark's main(), before torch or vLLM is imported.

    - VLLM_CPU_KVCACHE_SPACE=1 (GiB) for every engine we start: a 1 GiB KV cache is plenty for
      the benchmarks, and several engines plus learners must fit in 24 GiB.
    - OMP_WAIT_POLICY=PASSIVE: OpenMP threads that spin while they wait are a cliff on a shared CPU.
      With more runnable threads than cores (our server and learner together, or anything else
      running), a student+teacher step took 47-49 s with torch's default (active) waiting and 8-9 s
      with passive waiting; alone, 5.4-6.2 s either way (measured on this 2-core machine). Every
      process the benchmarks start, ours and the peer alike, inherits it, so the comparison stays
      like for like.
    - SIGTERM raises SystemExit: bench.run_all stops an overrunning section with SIGTERM, and the
      section's `finally` blocks must then stop the servers and learners it started in their own
      sessions (a signal to the section's process group does not reach them).
    """
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _exit_on_sigterm)


def _exit_on_sigterm(signum, _frame):
    raise SystemExit(128 + signum)


# ---------------------------------------------------------------- the embedded-default models


def seconds_left(default: float = float("inf")) -> float:
    """Seconds until the deadline bench.run_all gave this section (GKD_BENCH_DEADLINE), else `default`."""
    deadline = os.environ.get("GKD_BENCH_DEADLINE")
    return float(deadline) - time.time() if deadline else default


def demo_paths(with_data: bool = True) -> dict[str, Path]:
    """teacher / student / data directories of the demo, prepared (cached) if missing."""
    paths = {"teacher": DEMO / "teacher", "student": DEMO / "student-initial", "data": DEMO / "data"}
    need = ["teacher", "student"] + (["data"] if with_data else [])
    if any(not (paths[k] / ".prepared.json").exists() for k in need):
        cmd = [sys.executable, "-m", "demo.prepare", "--out", str(DEMO)] + (
            [] if with_data else ["--no_data"]
        )
        print(f"bench: preparing the demo models: {' '.join(cmd[1:])}", flush=True)
        subprocess.run(cmd, cwd=ROOT, check=True)
    return paths


def tiny_pair(work: Path, layers: int, hidden: int, teacher_layers: int) -> tuple[Path, Path, Path]:
    """The tiny test pair of shared.tiny made wider and deeper, and a 256-row dataset: for the
    benchmarks whose figures need sampling and training to take measurable time on a CPU."""
    from shared.tiny import build_model, build_tokenizer, write_dataset

    tok = work / "tokenizer"
    build_tokenizer(tok)
    kw = dict(hidden=hidden, intermediate=2 * hidden, heads=4, kv_heads=4, tokenizer_dir=tok)
    student = build_model(work / "student", num_layers=layers, seed=1, **kw)
    teacher = build_model(work / "teacher", num_layers=teacher_layers, seed=2, **kw)
    return Path(student), Path(teacher), write_dataset(work / "train.jsonl", n=256)


def add_run_settings(p) -> None:
    """The training settings both systems of the end-to-end benchmark share (one definition, so
    ours and TRL's GKDTrainer cannot drift apart in their defaults)."""
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--accum", type=int, default=1)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--lora_r", type=int, default=16)
    p.add_argument("--lora_alpha", type=int, default=32)
    p.add_argument("--lmbda", type=float, default=0.5)
    p.add_argument("--beta", type=float, default=0.5)
    p.add_argument("--temperature", type=float, default=0.9)
    p.add_argument("--max_new_tokens", type=int, default=64)


def layers(model_dir: Path) -> int:
    """num_hidden_layers of a prepared model directory (the pruned student's depth follows prepare's default)."""
    return int(json.loads((Path(model_dir) / "config.json").read_text())["num_hidden_layers"])


def read_rows(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def prompt_texts(n: int, split: str = "train") -> list[str]:
    """The first n demo prompts of a split (demo/data/prompts.jsonl: ours, no download)."""
    rows = [r for r in read_rows(ROOT / "demo" / "data" / "prompts.jsonl") if r["split"] == split]
    return [r["prompt"] for r in rows[:n]]


def chat_ids(tokenizer, text: str) -> list[int]:
    """Chat-templated prompt ids, the way the learner and demo.prepare build them."""
    templated = tokenizer.apply_chat_template(
        [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
    )
    return tokenizer(templated, add_special_tokens=False)["input_ids"]


def dir_bytes(path: Path, pattern: str = "*.safetensors") -> int:
    return sum(p.stat().st_size for p in Path(path).glob(pattern))


# ---------------------------------------------------------------- processes


def rollout_server(model: Path, log: Path, dtype: str = "float32", **flags: Any):
    """A `gkd-rollout-server` child process (demo.procs.RolloutServer); call .wait_ready()."""
    from demo.procs import RolloutServer

    extra: list[str] = []
    for k, v in flags.items():
        extra += [f"--{k}", str(v)]
    return RolloutServer(model, log, dtype=dtype, extra=extra)


class PeakRss:
    """The kernel's resident-memory high-water mark (VmHWM) of a child, sampled until it exits.

    VmHWM only grows, so the last sample taken is the peak up to that moment; sample at least once
    per training step and just before stopping the child.
    """

    def __init__(self, pid: int):
        self.pid, self.kib = pid, 0

    def sample(self) -> int:
        v = proc_status_kib(self.pid, "VmHWM")
        if v is not None:
            self.kib = max(self.kib, v)
        return self.kib * 1024


def read_jsonl_complete(path: Path) -> list[dict[str, Any]]:
    """Rows of a jsonl file another process is appending to (an unfinished last line is skipped)."""
    try:
        text = path.read_text()
    except OSError:
        return []
    rows = []
    for line in text.split("\n")[:-1]:
        if line.strip():
            with contextlib.suppress(ValueError):
                rows.append(json.loads(line))
    return rows


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds a process has used so far (0 once it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def proc_status_kib(pid: int, field: str) -> int | None:
    """A /proc/<pid>/status field in KiB (VmRSS, VmHWM); None once the process is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


# ---------------------------------------------------------------- figures


def pct(values: list[float], q: float) -> float:
    """The q-th percentile (0-100) by linear interpolation; with few samples, p95 is near the max."""
    s = sorted(values)
    if not s:
        return float("nan")
    k = (len(s) - 1) * q / 100
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def target(
    what: str, measured: float, goal: float, higher_is_better: bool = True, unit: str = "x"
) -> dict[str, Any]:
    """A target beside its measured figure, met or not; `line` is the sentence BENCHMARKS.md shows."""
    ok = measured == measured and (measured >= goal if higher_is_better else measured <= goal)
    op = ">=" if higher_is_better else "<="
    line = f"{what}: **{measured:.2f}{unit}** (target {op} {goal:g}{unit}): **{'met' if ok else 'NOT met'}**"
    return {
        "what": what,
        "measured": measured,
        "target": f"{op} {goal:g}{unit}",
        "unit": unit,
        "met": bool(ok),
        "line": line,
    }


def target_line(
    what: str, measured: float, goal: float, higher_is_better: bool = True, unit: str = "x"
) -> tuple[bool, str]:
    t = target(what, measured, goal, higher_is_better, unit)
    return t["met"], t["line"]


def table(header: list[str], rows: list[list[Any]]) -> str:
    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:,.0f}"
        return str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def write_result(name: str, data: dict[str, Any], md: str) -> None:
    """bench/out/<name>.json (raw figures) and bench/out/<name>.md (the BENCHMARKS.md fragment)."""
    OUT.mkdir(parents=True, exist_ok=True)
    data = {
        "section": name,
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "load_avg": os.getloadavg(),
        **data,
    }
    (OUT / f"{name}.json").write_text(json.dumps(data, indent=2, default=str) + "\n")
    (OUT / f"{name}.md").write_text(md.rstrip() + "\n")
    print(f"wrote {OUT / (name + '.json')} and {name}.md")


# A section written by a benchmark run on its own (not by `make bench`), between markers so a rerun
# replaces it and `make bench` (which rewrites the rest of BENCHMARKS.md) keeps it.
SECTION_RE = r"<!-- bench\.([\w.-]+):start -->.*?<!-- bench\.\1:end -->\n?"


def write_section(
    path: Path, md: str, key: str, title: str, when: str | None = None, alone: bool = True
) -> None:
    """Replace the `key` section of BENCHMARKS.md (between its `bench.<key>` markers), or append it.

    `when`: when it was measured (default: now, with the load average; a section rendered again
    from its saved record passes the original time). `alone`: nothing else ran meanwhile."""
    text = path.read_text() if path.exists() else ""
    start, end = f"<!-- bench.{key}:start -->", f"<!-- bench.{key}:end -->"
    when = when or f"{time.strftime('%Y-%m-%d %H:%M')} ({load_note()})"
    body = re.sub(r"\A## [^\n]*\n+", "", md.strip() + "\n")  # `title` heads the section: not md's own
    how = "run on its own" if alone else "with other work on the machine"
    block = f"{start}\n## {title}\n\nMeasured {when}, {how}.\n\n{body.rstrip()}\n{end}\n"
    if start in text and end in text:
        head, rest = text.split(start, 1)
        text = head + block + rest.split(end, 1)[1].lstrip("\n")
    else:
        text = text.rstrip("\n") + ("\n\n" if text else "") + block
    path.write_text(text)


def standalone_sections(text: str) -> list[str]:
    """The sections `write_section` put in a BENCHMARKS.md text, in order."""
    return [m.group(0) for m in re.finditer(SECTION_RE, text, re.S)]


def load_note() -> str:
    one, five, _ = os.getloadavg()
    return f"load average at the end of this section: {one:.1f} (1 min), {five:.1f} (5 min) on {os.cpu_count()} cores"
