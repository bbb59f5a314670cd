"""Benchmark: how many rollout replicas one learner needs, for the seed pair (Qwen2-0.5B / 1.5B).

    python -m bench.sizing                  # on this machine (CPU): a replica on one core, the learner on all
    python -m bench.sizing --core 1 --steps 3

One optimizer step of the seed (TRL's examples/scripts/gkd.py: batch 4 x gradient accumulation 8,
lmbda 0.5, max_new_tokens 128) trains S = 4 x 8 x lmbda = 16 on-policy completions of up to L = 128
new tokens, so it needs S x L rollout tokens. With r a replica's generation rate (tokens/s) and t
the learner's own time per optimizer step (without waiting), N replicas keep up once
S x L / (N x r) <= t:

    N = ceil(S x L / (r x t))

Both figures are measured here, on models shaped like the seed's (bench/configs/, random weights,
no hub; the tiny test tokenizer, since the server never detokenizes):

- r: one `gkd-rollout-server` on the 0.5B-shaped student, pinned to `--core` (one replica's share
  of this machine), generating S prompts x L new tokens at once; completion tokens / wall time,
  median of `--reps` after a warm-up;
- t: the learner's time for one micro-batch of the seed (bench.gpu_check.check_train on this
  device: LoRA r64 alpha16 on all linear layers, gradient checkpointing, the teacher's forward and
  the JSD), median over `--steps`, times the seed's 8 micro-batches per optimizer step.

The same formula sizes a GPU box: take r from one replica on one GPU (the `replicas` figures in
metrics.jsonl, or this benchmark's replica measurement run there) and t from
`python -m bench.gpu_check` (`s_per_step` is one micro-batch of 4). Writes bench/out/sizing.{json,md}
and its section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

from bench.common import ROOT, load_note, median, rollout_server, setup_process, write_result, write_section

CONFIGS = ROOT / "bench" / "configs"
SEED = {"batch": 4, "accum": 8, "lmbda": 0.5, "max_new_tokens": 128, "prompt_len": 64}


def build_student(out: Path) -> Path:
    """The Qwen2-0.5B-shaped student with random weights, saved with the tiny tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    from shared.tiny import build_tokenizer

    tok = build_tokenizer(out)
    cfg = Qwen2Config(**json.loads((CONFIGS / "qwen2-0.5b.json").read_text()))
    cfg.eos_token_id, cfg.pad_token_id, cfg.bos_token_id = tok.eos_token_id, tok.pad_token_id, None
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).save_pretrained(str(out))
    return out


def replica_rate(model: Path, log: Path, core: int, n: int, args) -> dict:
    """Tokens/s of one replica pinned to `core`, n prompts x max_new_tokens in one request."""
    import random

    from shared.messages import GenerateRequest, Prompt, SamplingSpec

    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = str(core)  # the child's environment (vLLM's binding)
    server = rollout_server(model, log, max_model_len=512)
    os.environ.pop("VLLM_CPU_OMP_THREADS_BIND")
    os.sched_setaffinity(server.proc.pid, {core})  # what `taskset -c core` does; children inherit it
    rng = random.Random(0)
    prompts = [[rng.randrange(10, 300) for _ in range(SEED["prompt_len"])] for _ in range(n)]
    sampling = SamplingSpec(temperature=0.9, top_k=0, max_new_tokens=SEED["max_new_tokens"], seed=0)
    runs = []
    try:
        c = server.wait_ready()  # its client (600 s per call)
        for k in range(args.reps + 1):  # the first is the warm-up
            req = GenerateRequest(
                request_id=f"r{k}",
                prompts=[Prompt(prompt_id=str(i), token_ids=p) for i, p in enumerate(prompts)],
                sampling=sampling,
            )
            t0 = time.perf_counter()
            reply = c.generate(req)
            wall = time.perf_counter() - t0
            tokens = sum(len(x.token_ids) for x in reply.completions)
            print(f"replica: {tokens} tokens in {wall:.1f} s = {tokens / wall:.1f} tokens/s", flush=True)
            if k:
                runs.append({"tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall})
    finally:
        server.stop()
    return {"core": core, "runs": runs, "tokens_per_s": median([r["tokens_per_s"] for r in runs])}


def learner_step(args) -> dict:
    import torch

    from bench.gpu_check import check_train

    torch.set_num_threads(os.cpu_count() or 1)
    r = check_train(
        torch.device("cpu"),
        tiny=False,
        steps=args.steps,
        prompt_len=SEED["prompt_len"],
        new_tokens=SEED["max_new_tokens"],
        dtype=torch.float32,
    )
    print(f"learner: {r['s_per_step']:.1f} s per micro-batch of {SEED['batch']}", flush=True)
    return r


def main(argv: list[str] | None = None) -> int:
    setup_process()
    p = argparse.ArgumentParser(prog="bench.sizing", description=__doc__.splitlines()[0])
    p.add_argument("--core", type=int, default=0, help="the core the replica is pinned to")
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--steps", type=int, default=3, help="learner micro-batches timed (the first is left out)")
    args = p.parse_args(argv)
    s = int(SEED["batch"] * SEED["accum"] * SEED["lmbda"])
    length = SEED["max_new_tokens"]
    work = Path(tempfile.mkdtemp(prefix="gkd-bench-sizing-"))
    t0 = time.perf_counter()
    student = build_student(work / "student")
    replica = replica_rate(student, work / "server.log", args.core, s, args)
    step = learner_step(args)
    r = replica["tokens_per_s"]
    t = step["s_per_step"] * SEED["accum"]
    n = math.ceil(s * length / (r * t))
    res = {
        "seed": SEED,
        "S": s,
        "L": length,
        "replica": replica,
        "learner": {k: v for k, v in step.items() if k != "losses"},
        "t_s": t,
        "replicas_needed": n,
        "wall_s": time.perf_counter() - t0,
    }
    md = (
        "## Sizing: how many rollout replicas one learner needs\n\n"
        "For the seed pair (Qwen2-0.5B student, Qwen2-1.5B teacher; shapes from bench/configs/, "
        "random weights), with the seed's settings (batch 4 x accumulation 8, lmbda 0.5, "
        "max_new_tokens 128, LoRA r64, gradient checkpointing), on this machine (CPU, fp32):\n\n"
        f"- one optimizer step trains S = 4 x 8 x 0.5 = {s} on-policy completions of up to L = {length} "
        f"tokens: {s * length} rollout tokens;\n"
        f"- r = {r:.1f} tokens/s: one replica on one core, {s} prompts x {length} new tokens at once "
        f"(median of {len(replica['runs'])});\n"
        f"- t = {step['s_per_step']:.1f} s per micro-batch of 4 x 8 = {t:.0f} s per optimizer step (learner on "
        f"{os.cpu_count()} cores, no rollout server running);\n"
        f"- N = ceil(S x L / (r x t)) = ceil({s * length} / ({r:.1f} x {t:.0f})) = **{n}** "
        f"replica{'s' if n != 1 else ''} before the learner stops waiting.\n\n"
        "On GPUs, redo it with your own figures: r from one replica on one GPU (the `replicas` rows of "
        "metrics.jsonl give `tokens_per_s` under load), t from `python -m bench.gpu_check` "
        "(`s_per_step` is one micro-batch of 4) times the gradient accumulation. The derivation and "
        "its caveats (max_inflight >= N, max_staleness >= 1 to overlap steps, reload time per push) "
        "are in docs/replicas.md.\n\n"
        f"- {load_note()}\n"
    )
    write_result("sizing", res, md)
    write_section(ROOT / "BENCHMARKS.md", md, "sizing", "Sizing (`python -m bench.sizing`)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
