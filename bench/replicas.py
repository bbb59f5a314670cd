"""Benchmark: rollout throughput of 1 against 2 replicas, and push fan-out latency to 1 and 2.

    python -m bench.replicas                      # 64 prompts x 64 new tokens, 3 reps, 10 pushes
    python -m bench.replicas --cores 0,1 --pushes 20

Two `gkd-rollout-server` processes on the demo student, each pinned to a core of its own (the
`taskset -c` affinity, set on the server before its engine process starts, so the engine inherits
it; vLLM's own OpenMP binding is told the same core). No learner runs: the learner is idle.

- throughput: the same work (`--prompts` prompts split into `--requests` generate requests, all in
  flight at once) through one client to replica 0 alone, then through a replica set over both
  (least-outstanding routing); completion tokens / wall time, median of `--reps` after a warm-up.
  Target: 2 replicas >= 1.7x 1 replica.
- push fan-out: real PushAdapter messages (bench.sync.make_adapters: PEFT LoRA on the student,
  as the learner builds them), client wall time from send to the reply, which each server sends
  after its reload and canary; to replica 0 alone, then to both at once through the replica set
  (which returns when both have answered). p50 / p95 after `--warmup` pushes.

Needs a quiet machine: with other work on the cores, the two replicas do not get a core each.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from bench.common import (
    OUT,
    ROOT,
    chat_ids,
    demo_paths,
    load_note,
    median,
    pct,
    prompt_texts,
    rollout_server,
    setup_process,
    table,
    target,
    write_result,
    write_section,
)

TARGET = 1.7


def pinned_server(model, log, core: int):
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = str(core)  # the child's environment (vLLM's binding)
    server = rollout_server(model, log)
    os.environ.pop("VLLM_CPU_OMP_THREADS_BIND")
    os.sched_setaffinity(server.proc.pid, {core})  # what `taskset -c core` does; children inherit it
    return server


def rate(client, prompts: list[list[int]], args, tag: str) -> dict:
    """All requests in flight at once; completion tokens per second of wall time."""
    from shared.messages import GenerateRequest, Prompt, SamplingSpec

    per = max(1, len(prompts) // args.requests)
    chunks = [prompts[i : i + per] for i in range(0, len(prompts), per)]
    sampling = SamplingSpec(temperature=0.9, top_k=0, max_new_tokens=args.max_new_tokens, seed=0)
    t = time.perf_counter()
    ids = [
        client.submit(
            GenerateRequest(
                request_id=f"{tag}-{j}",
                prompts=[Prompt(prompt_id=str(i), token_ids=p) for i, p in enumerate(chunk)],
                sampling=sampling,
            )
        )
        for j, chunk in enumerate(chunks)
    ]
    tokens = sum(len(c.token_ids) for rid in ids for c in client.result(rid, timeout_s=900).completions)
    wall = time.perf_counter() - t
    return {"tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall}


def throughput(client, prompts, args, label: str) -> dict:
    rate(client, prompts[: max(1, args.requests)], args, f"{label}-warm")
    runs = [rate(client, prompts, args, f"{label}-{k}") for k in range(args.reps)]
    for r in runs:
        print(
            f"{label}: {r['tokens']} tokens in {r['wall_s']:.1f} s = {r['tokens_per_s']:.0f} tokens/s",
            flush=True,
        )
    return {"runs": runs, "tokens_per_s": median([r["tokens_per_s"] for r in runs])}


def fan_out(client, msgs, args, label: str) -> dict:
    walls = []
    for msg in msgs:
        t = time.perf_counter()
        reply = client.push_adapter(msg, timeout_s=300)
        walls.append(time.perf_counter() - t)
        print(f"{label}: v{reply.version} push {walls[-1] * 1e3:.0f} ms", flush=True)
    timed = walls[args.warmup :]
    return {"walls_s": walls, "p50_s": median(timed), "p95_s": pct(timed, 95), "n": len(timed)}


def main(argv: list[str] | None = None) -> int:
    setup_process()
    p = argparse.ArgumentParser(prog="bench.replicas", description=__doc__.split("\n\n")[0])
    p.add_argument("--prompts", type=int, default=64)
    p.add_argument("--requests", type=int, default=8, help="generate requests the prompts are split into")
    p.add_argument("--max_new_tokens", type=int, default=64)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--pushes", type=int, default=10)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--cores", default="0,1", help="the two cores, one per replica")
    p.add_argument("--lora_r", type=int, default=16)
    args = p.parse_args(argv)
    cores = [int(c) for c in args.cores.split(",")]
    if len(cores) != 2:
        p.error("--cores takes two cores")

    from transformers import AutoTokenizer

    from bench.sync import make_adapters
    from shared.transport import connect

    paths = demo_paths(with_data=False)
    student = paths["student"]
    tok = AutoTokenizer.from_pretrained(str(student))
    texts = prompt_texts(args.prompts)
    prompts = [chat_ids(tok, t) for t in texts][: args.prompts]
    n = args.pushes + args.warmup
    _, _, _, _, msgs, _ = make_adapters(student, 2 * n, args.lora_r, 2 * args.lora_r, seed=0)

    servers = [pinned_server(student, OUT / "logs" / f"replica-{i}.log", c) for i, c in enumerate(cores)]
    res: dict = {"cores": cores, "args": vars(args)}
    try:
        for s in servers:
            s.wait_ready()
        one = connect(servers[0].url, timeout_s=900)
        both = connect(f"{servers[0].url},{servers[1].url}", timeout_s=900)
        res["throughput_1"] = throughput(one, prompts, args, "1 replica")
        res["throughput_2"] = throughput(both, prompts, args, "2 replicas")
        res["push_1"] = fan_out(one, msgs[:n], args, "push to 1")
        res["push_2"] = fan_out(both, msgs[n:], args, "push to 2")
        res["served"] = [s.client.status(timeout_s=30).served_requests for s in servers]
        one.close()
        both.close()
    finally:
        for s in servers:
            s.stop()
    ratio = res["throughput_2"]["tokens_per_s"] / res["throughput_1"]["tokens_per_s"]
    res["targets"] = [target("rollout tokens/s, 2 replicas / 1 replica (a core each)", ratio, TARGET)]
    md = _markdown(res, args)
    write_result("replicas", res, md)
    write_section(ROOT / "BENCHMARKS.md", md, "replicas", "Rollout replicas (`python -m bench.replicas`)")
    return 0


def _markdown(res: dict, args) -> str:
    t1, t2, p1, p2 = res["throughput_1"], res["throughput_2"], res["push_1"], res["push_2"]
    rows = [
        [
            "1 replica",
            f"{t1['tokens_per_s']:.0f}",
            f"{p1['p50_s'] * 1e3:.0f}",
            f"{p1['p95_s'] * 1e3:.0f}",
            p1["n"],
        ],
        [
            "2 replicas",
            f"{t2['tokens_per_s']:.0f}",
            f"{p2['p50_s'] * 1e3:.0f}",
            f"{p2['p95_s'] * 1e3:.0f}",
            p2["n"],
        ],
    ]
    return (
        "## Replicas: rollout throughput and push fan-out\n\n"
        f"`python -m bench.replicas`: {args.prompts} prompts x {args.max_new_tokens} new tokens in "
        f"{args.requests} requests, each replica pinned to a core of its own ({res['cores']}), no learner.\n\n"
        + table(["replicas", "rollout tokens/s (median)", "push p50 (ms)", "push p95 (ms)", "pushes"], rows)
        + "\n- "
        + res["targets"][0]["line"]
        + f"\n- requests served per replica over the whole run: {res['served']}\n- {load_note()}\n"
    )


if __name__ == "__main__":
    sys.exit(main())
