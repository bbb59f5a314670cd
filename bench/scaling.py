"""Benchmark: how our time per step and peak memory grow as max_new_tokens and batch size double.

    python -m bench.scaling                               # 64 -> 128 -> 256 tokens at batch 4; batch 2 -> 4 -> 8 at 64 tokens
    python -m bench.scaling --steps 8 --tokens 64,128,256,512

One rollout server (the demo student, merged mode) serves every configuration; for each one a
fresh learner trains `--steps` optimizer steps with the end-to-end benchmark's settings, except
lmbda = 1 (every micro-batch on-policy), so that generation, which is what max_new_tokens sizes,
is inside every step. The first `--warmup` steps are left out of the time per step (the pipeline
fills then). Peak memory is the kernel's resident high-water mark (VmHWM) of the learner process;
the server's is reported beside it (its KV cache is preallocated, so it barely moves).

Completions end at EOS, so doubling max_new_tokens does not always double the tokens trained:
the tokens actually trained per step are reported next to each time, and the growth verdict uses
time per step against the doubling of the setting.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from bench.common import (
    OUT,
    PeakRss,
    demo_paths,
    load_note,
    median,
    read_jsonl_complete,
    rollout_server,
    seconds_left,
    setup_process,
    table,
    write_result,
)
from bench.end_to_end import build_parser as e2e_parser
from bench.end_to_end import learner_cmd
from shared import procs


def run_config(paths: dict, args, url: str, batch: int, tokens: int, work: Path) -> dict:
    out = work / f"b{batch}-t{tokens}"
    a = argparse.Namespace(
        **{**vars(args), "batch": batch, "max_new_tokens": tokens, "lmbda": 1.0, "save_steps": 10**6}
    )
    cmd = learner_cmd(paths, a, out, url, max_steps=args.steps, max_length=max(1024, 512 + tokens))
    log = OUT / "logs" / f"scaling-{out.name}.log"
    proc = procs.start(cmd, log)
    peak = PeakRss(proc.pid)
    t0 = time.time()
    try:
        while proc.poll() is None:
            peak.sample()
            time.sleep(0.2)
            if time.time() - t0 > args.timeout_s:
                raise RuntimeError(
                    f"learner batch {batch} tokens {tokens} did not finish in {args.timeout_s:.0f} s:\n{procs.log_tail(log)}"
                )
    finally:
        procs.stop(proc)
    if proc.returncode != 0:
        raise RuntimeError(
            f"learner batch {batch} tokens {tokens} exited with {proc.returncode}:\n{procs.log_tail(log)}"
        )
    rows = [r for r in read_jsonl_complete(out / "metrics.jsonl") if "seconds_per_step" in r]
    timed = rows[args.warmup :]
    secs = [r["seconds_per_step"] for r in timed]
    toks = [r["tokens_per_s"] * r["seconds_per_step"] for r in timed]
    res = {
        "batch": batch,
        "max_new_tokens": tokens,
        "steps": len(rows),
        "timed_steps": len(timed),
        "s_per_step": median(secs),
        "s_per_step_all": [r["seconds_per_step"] for r in rows],
        "tokens_per_step": sum(toks) / len(toks) if toks else 0.0,
        "tokens_per_s": sum(toks) / sum(secs) if secs else 0.0,
        "rollout_wait_s": median([r.get("rollout_wait_s") or 0.0 for r in timed]),
        "push_s": median([r.get("push_s") or 0.0 for r in timed]),
        "learner_peak_rss_bytes": peak.kib * 1024,
        "wall_s": time.time() - t0,
    }
    print(
        f"batch {batch} tokens {tokens}: {res['s_per_step']:.2f} s/step, {res['tokens_per_step']:.0f} tokens/step, "
        f"peak RSS {res['learner_peak_rss_bytes'] / 1e9:.2f} GB",
        flush=True,
    )
    return res


def verdict(series: list[dict], key: str) -> list[str]:
    """One line per doubling (time and memory growth factors), then a linear fit over the series."""
    if len(series) < 2:
        return [f"fewer than two {key} settings measured: no growth factor"]
    lines = []
    for a, b in zip(series, series[1:]):
        f = b["s_per_step"] / a["s_per_step"]
        fm = b["learner_peak_rss_bytes"] / a["learner_peak_rss_bytes"]
        ft = b["tokens_per_step"] / a["tokens_per_step"] if a["tokens_per_step"] else float("nan")
        kind = (
            "flat (fixed per-step costs dominate)"
            if f < 1.15
            else "sub-linear"
            if f < 1.7
            else "about linear"
            if f <= 2.3
            else "super-linear"
        )
        lines.append(
            f"{key} {a[key]} -> {b[key]}: time per step x{f:.2f} ({kind}); tokens trained per step x{ft:.2f}; "
            f"time per trained token x{f / ft:.2f}; learner peak RSS x{fm:.2f}"
        )
    fixed, per_token, worst = linear_fit(
        [r["tokens_per_step"] for r in series], [r["s_per_step"] for r in series]
    )
    if fixed == fixed:
        shape = (
            "two points, so the line is exact"
            if len(series) == 2
            else f"fits a straight line: worst point {100 * worst:.0f}% off"
            if worst <= 0.15
            else f"is NOT a straight line: worst point {100 * worst:.0f}% off"
        )
        push = median([r["push_s"] for r in series])
        lines.append(
            f"fit over the series: time per step = {fixed:.2f} s + {per_token * 1e3:.1f} ms x tokens trained per step "
            f"({shape}); the intercept is the per-step cost that does not shrink with the work "
            f"(the adapter push with its canary alone: median {push:.2f} s per step)"
        )
    return lines


def linear_fit(x: list[float], y: list[float]) -> tuple[float, float, float]:
    """Least squares y = a + b x; returns (a, b, worst relative residual). NaNs with < 2 distinct x."""
    n = len(x)
    mx, my = sum(x) / n, sum(y) / n
    sxx = sum((xi - mx) ** 2 for xi in x)
    if n < 2 or sxx == 0:
        return float("nan"), float("nan"), float("nan")
    b = sum((xi - mx) * (yi - my) for xi, yi in zip(x, y)) / sxx
    a = my - b * mx
    worst = max(abs(a + b * xi - yi) / yi for xi, yi in zip(x, y))
    return a, b, worst


def main(argv: list[str] | None = None) -> int:
    p = e2e_parser()  # the end-to-end settings (LoRA, lr, beta, ...), so both sections train alike
    p.description = __doc__.splitlines()[0]
    p.add_argument("--steps", type=int, default=3, help="optimizer steps per configuration")
    p.add_argument("--warmup", type=int, default=1, help="first steps left out of the time per step")
    p.add_argument("--tokens", default="64,128,256", help="max_new_tokens series (at --base_batch)")
    p.add_argument("--batches", default="2,4,8", help="batch-size series (at --base_tokens)")
    p.add_argument("--base_batch", type=int, default=4)
    p.add_argument("--base_tokens", type=int, default=64)
    p.add_argument("--timeout_s", type=float, default=600.0, help="per configuration")
    p.add_argument(
        "--section_budget_s",
        type=float,
        default=420.0,
        help="no configuration starts that would end after this long",
    )
    args = p.parse_args(argv)
    setup_process()
    paths = demo_paths(with_data=True)
    tokens = [int(x) for x in args.tokens.split(",")]
    batches = [int(x) for x in args.batches.split(",")]
    # Cheapest first, so a run that hits --section_budget_s loses the biggest configuration, not the base.
    configs = sorted(
        {(args.base_batch, t) for t in tokens} | {(b, args.base_tokens) for b in batches},
        key=lambda c: c[0] * c[1],
    )
    work = Path(tempfile.mkdtemp(prefix="gkd-bench-scaling-"))
    server = rollout_server(
        paths["student"], OUT / "logs" / "scaling-server.log", max_model_len=max(2048, 1024 + max(tokens))
    )
    results = {}
    try:
        server.wait_ready()
        speak = PeakRss(server.proc.pid)
        t_section, last = time.time(), None
        for batch, n in configs:
            # Configurations grow by at most 2x in work; one predicted to overrun is left out (and said so).
            need = (
                0.0
                if last is None
                else last["wall_s"] * (batch * n) / (last["batch"] * last["max_new_tokens"])
            )
            left = min(args.section_budget_s - (time.time() - t_section), seconds_left() - 20)
            if left < need or left <= 0:
                print(
                    f"time budget: batch {batch} x {n} tokens not run ({left:.0f} s left, ~{need:.0f} s needed)",
                    flush=True,
                )
                continue
            last = results[(batch, n)] = run_config(paths, args, server.url, batch, n, work)
        server_peak = speak.sample()
    finally:
        server.stop()
        import shutil

        shutil.rmtree(work, ignore_errors=True)
    by_tokens = [results[(args.base_batch, t)] for t in tokens if (args.base_batch, t) in results]
    by_batch = [results[(b, args.base_tokens)] for b in batches if (b, args.base_tokens) in results]
    skipped = [c for c in configs if c not in results]
    data = {
        "settings": vars(args),
        "by_max_new_tokens": by_tokens,
        "by_batch": by_batch,
        "server_peak_rss_bytes": server_peak,
        "verdict_tokens": verdict(by_tokens, "max_new_tokens"),
        "verdict_batch": verdict(by_batch, "batch"),
        "skipped": [{"batch": b, "max_new_tokens": n} for b, n in skipped],
    }
    for line in data["verdict_tokens"] + data["verdict_batch"]:
        print(line)
    write_result("scaling", data, markdown(data, args))
    return 0


def markdown(d: dict, args) -> str:
    def rows(series):
        return [
            [
                r["batch"],
                r["max_new_tokens"],
                r["s_per_step"],
                f"{r['tokens_per_step']:.0f}",
                r["tokens_per_s"],
                r["rollout_wait_s"],
                r.get("push_s", float("nan")),
                f"{r['learner_peak_rss_bytes'] / 1e9:.2f} GB",
            ]
            for r in series
        ]

    head = [
        "batch",
        "max_new_tokens",
        "s/step (median)",
        "tokens trained/step",
        "tokens/s",
        "blocked on rollouts (s/step)",
        "adapter push (s/step)",
        "learner peak RSS",
    ]
    md = [
        "## 5. Scaling: time per step and peak memory as the work doubles (ours)\n",
        f"One rollout server (demo student, fp32) and a fresh learner per configuration, {args.steps} optimizer steps each, the first "
        f"{args.warmup} left out of the medians; the end-to-end settings (LoRA r={args.lora_r}, gradient checkpointing on, accumulation "
        f"{args.accum}) except lmbda = 1, so every step samples from the server and max_new_tokens sizes real work. "
        f"Server peak RSS over all runs: {d['server_peak_rss_bytes'] / 1e9:.2f} GB.\n",
        f"max_new_tokens doubling (batch {args.base_batch}):\n",
        table(head, rows(d["by_max_new_tokens"])),
        *[f"- {x}" for x in d["verdict_tokens"]],
        f"\nbatch size doubling (max_new_tokens {args.base_tokens}):\n",
        table(head, rows(d["by_batch"])),
        *[f"- {x}" for x in d["verdict_batch"]],
        "",
        *(
            [
                "- not run (the section's time budget was spent): "
                + ", ".join(f"batch {x['batch']} x {x['max_new_tokens']} tokens" for x in d["skipped"])
            ]
            if d["skipped"]
            else []
        ),
        f"- {load_note()}",
    ]
    return "\n".join(md) + "\n"


if __name__ == "__main__":
    sys.exit(main())
