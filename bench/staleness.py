"""Benchmark: what overlapping sampling with training across steps buys (max_staleness 0 vs 1).

`max_staleness 0` (the default, TRL's strict on-policy) overlaps sampling with training only inside
an optimizer step: micro-batch i+1 is sampled while micro-batch i trains, and the next step's
requests wait on the server until its push. `max_staleness 1` lets them run one version ahead.
Both runs use one rollout server, the same seed and settings, every micro-batch on-policy (lmbda 1),
and a push every step; the figure is the median seconds per step after the first `--skip` steps.

Models: the tiny test pair from shared.tiny, made wider and deeper (`--layers`, `--hidden`) so
that sampling and training both take measurable time on a CPU.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

from bench.common import OUT, read_rows, rollout_server, setup_process, tiny_pair
from shared import procs


def run_learner(paths, url: str, out: Path, staleness: int, args) -> list[dict]:
    student, teacher, data = paths
    flags = {
        "model_name_or_path": student,
        "teacher_model_name_or_path": teacher,
        "dataset_name": data,
        "output_dir": out,
        "rollout_url": url,
        "per_device_train_batch_size": args.batch,
        "gradient_accumulation_steps": args.accum,
        "max_steps": args.steps,
        "max_new_tokens": args.max_new_tokens,
        "max_length": 256,
        # what the figures in BENCHMARKS.md were measured with (the defaults became TRL's since)
        "use_peft": "true",
        "lora_target_modules": "all-linear",
        "loss_temperature": 0.9,
        "lmbda": 1,
        "sync_steps": 1,
        "max_staleness": staleness,
        "max_inflight": args.accum,
        "logging_steps": 1,
        "save_steps": 10_000,
        "learning_rate": 1e-4,
        "torch_dtype": "float32",
        "seed": 3,
    }
    cmd = [sys.executable, "-m", "learner.cli"]
    for k, v in flags.items():
        cmd += [f"--{k}", str(v)]
    log = out.parent / f"learner-staleness{staleness}.log"
    proc = procs.start(cmd, log)
    try:
        if proc.wait(args.timeout_s) != 0:
            raise RuntimeError(f"learner (max_staleness {staleness}) failed:\n{procs.log_tail(log)}")
    finally:
        procs.stop(proc)
    return [r for r in read_rows(out / "metrics.jsonl") if "loss" in r]


def main(argv: list[str] | None = None) -> int:
    setup_process()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--accum", type=int, default=2)
    p.add_argument("--max_new_tokens", type=int, default=64)
    p.add_argument("--steps", type=int, default=14)
    p.add_argument("--skip", type=int, default=3, help="first steps left out (warm-up)")
    p.add_argument("--timeout_s", type=float, default=900)
    args = p.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="gkd-bench-staleness-"))
    paths = tiny_pair(work, args.layers, args.hidden, args.layers + 1)
    server = rollout_server(paths[0], work / "server.log", max_model_len=512)
    res: dict = {"settings": vars(args)}
    try:
        server.wait_ready()
        for s in (0, 1):
            rows = run_learner(paths, server.url, work / f"run{s}", s, args)
            per_step = [r["seconds_per_step"] for r in rows[args.skip :]]
            res[f"staleness{s}"] = {
                "median_s_per_step": statistics.median(per_step),
                "mean_staleness": statistics.mean(r["staleness"] or 0 for r in rows),
                "rollout_wait_s_per_step": statistics.median(r["rollout_wait_s"] for r in rows[args.skip :]),
                "steps_measured": len(per_step),
            }
    finally:
        server.stop()
    s0, s1 = res["staleness0"]["median_s_per_step"], res["staleness1"]["median_s_per_step"]
    res["speedup"] = s0 / s1
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "staleness.json").write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
