"""Benchmark: adapter push -> new weights serving, for the three ways to get new weights into vLLM.

    python -m bench.sync                      # 10 pushes per mode, 3 restarts, the demo student
    python -m bench.sync --pushes 20 --restarts 5

1. merged (our default): the server merges the pushed LoRA into its pristine fp32 base and reloads
   the touched weights in place (`gkd-rollout-server --sync_mode merged`);
2. lora: vLLM's own LoRA hot-loading under a new name per version (`--sync_mode lora`);
3. restart (the naive way): merge the adapter into a full model, save it, start a fresh engine on
   that directory and wait until it answers a generate request.

Every push is a real PushAdapter built the way the learner builds it (PEFT LoRA on the student,
r and alpha as in the end-to-end run, all linear projections, random lora_B so each push changes the
weights) with the learner's canary. After each push the server's canary logprobs are checked
against HF+PEFT with the same adapter (learner.sync.compare): "new weights serving" is verified, not
assumed. Latency is the client's wall time from sending the push to the reply (which the server
sends only after the reload and the canary), and the server's own reload_s beside it.
Bytes on the wire: the encoded message for a push; the merged model's safetensors for a restart.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from bench.common import (
    OUT,
    chat_ids,
    demo_paths,
    dir_bytes,
    load_note,
    median,
    pct,
    prompt_texts,
    rollout_server,
    setup_process,
    table,
    target,
    write_result,
)

TARGET_P50_S = 1.0


def make_adapters(student_dir: Path, n: int, r: int, alpha: int, seed: int):
    """n PushAdapter messages (versions 1..n) and the PEFT model to check canaries with."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from learner.models import adapter_tensors, lora_spec
    from learner.sync import canary_ids
    from shared.adapters import pack, sha256_hex
    from shared.messages import PushAdapter

    tok = AutoTokenizer.from_pretrained(str(student_dir))
    base = AutoModelForCausalLM.from_pretrained(str(student_dir), dtype=torch.float32)
    peft = get_peft_model(
        base,
        LoraConfig(
            r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM"
        ),
    ).eval()
    canary = canary_ids(tok)
    gen = torch.Generator().manual_seed(seed)
    states, msgs, pack_s = [], [], []
    for version in range(1, n + 1):
        with torch.no_grad():
            for name, p in peft.named_parameters():
                if "lora_B" in name:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
        tensors = {
            k: v.clone() for k, v in adapter_tensors(peft).items()
        }  # on CPU these alias the live parameters
        t0 = time.perf_counter()
        data = pack(tensors)
        pack_s.append(time.perf_counter() - t0)
        states.append(tensors)
        msgs.append(
            PushAdapter(
                version=version,
                adapter=data,
                sha256=sha256_hex(data),
                lora=lora_spec(peft),
                canary_ids=canary,
            )
        )
    return peft, tok, canary, states, msgs, pack_s


def push_mode(mode: str, student: Path, peft, canary, states, msgs, prompts, args) -> dict:
    """Start a server in `mode`, push every adapter, verify each canary; then time decoding."""
    from learner.models import load_adapter_tensors, token_logprobs
    from learner.sync import compare
    from shared.messages import Envelope, GenerateRequest, Prompt, SamplingSpec, encode

    server = rollout_server(
        student, OUT / "logs" / f"sync-{mode}.log", sync_mode=mode, max_lora_rank=args.lora_r
    )
    t0 = time.perf_counter()
    try:
        client = server.wait_ready()
        start_s = time.perf_counter() - t0
        pushes = []
        for msg, tensors in zip(msgs, states):
            t = time.perf_counter()
            reply = client.push_adapter(msg, timeout_s=300)
            wall = time.perf_counter() - t
            load_adapter_tensors(peft, tensors)
            _, max_abs = compare(
                token_logprobs(peft, canary, "cpu"),
                list(reply.canary_logprobs),
                peft.dtype,
                reply.serving_dtype,
            )
            pushes.append(
                {
                    "version": reply.version,
                    "wall_s": wall,
                    "reload_s": reply.reload_s,
                    "canary_max_abs": max_abs,
                    "wire_bytes": len(encode(Envelope(body=msg))),
                    "adapter_bytes": len(msg.adapter),
                }
            )
            print(
                f"{mode}: v{reply.version} push {wall * 1e3:.0f} ms (server reload {reply.reload_s * 1e3:.0f} ms), canary max |d| {max_abs:.1e}",
                flush=True,
            )
        decode = None
        if args.decode_tokens:
            req = GenerateRequest(
                request_id="decode",
                prompts=[Prompt(prompt_id=str(i), token_ids=p) for i, p in enumerate(prompts)],
                sampling=SamplingSpec(temperature=0.9, top_k=0, max_new_tokens=args.decode_tokens, seed=0),
            )
            t = time.perf_counter()
            rep = client.generate(req, timeout_s=600)
            n = sum(len(c.token_ids) for c in rep.completions)
            decode = {
                "tokens": n,
                "wall_s": time.perf_counter() - t,
                "tokens_per_s": n / (time.perf_counter() - t),
                "policy_version": rep.policy_version,
            }
    finally:
        server.stop()
    timed = pushes[args.warmup :]
    return {
        "mode": mode,
        "engine_start_s": start_s,
        "pushes": pushes,
        "warmup": args.warmup,
        "p50_s": median([p["wall_s"] for p in timed]),
        "p95_s": pct([p["wall_s"] for p in timed], 95),
        "reload_p50_s": median([p["reload_s"] for p in timed]),
        "reload_p95_s": pct([p["reload_s"] for p in timed], 95),
        "wire_bytes": pushes[-1]["wire_bytes"],
        "decode_after_push": decode,
    }


def restart_mode(student: Path, peft, tok, last: dict, args) -> dict:
    """Merge + save a full model, then time fresh server starts on it until a generate answers."""
    from learner.models import load_adapter_tensors
    from shared.messages import GenerateRequest, Prompt, SamplingSpec

    load_adapter_tensors(peft, last)
    work = Path(tempfile.mkdtemp(prefix="gkd-bench-restart-"))
    merged_dir = work / "merged"
    t0 = time.perf_counter()
    import copy

    copy.deepcopy(peft).merge_and_unload().save_pretrained(str(merged_dir))
    tok.save_pretrained(str(merged_dir))
    save_s = time.perf_counter() - t0
    probe = GenerateRequest(
        request_id="probe",
        prompts=[Prompt(prompt_id="0", token_ids=chat_ids(tok, "Hello"))],
        sampling=SamplingSpec(temperature=0.0, max_new_tokens=1),
    )
    starts = []
    for i in range(args.restarts):
        t = time.perf_counter()
        server = rollout_server(merged_dir, OUT / "logs" / f"sync-restart-{i}.log")
        try:
            client = server.wait_ready()
            client.generate(probe, timeout_s=300)
            starts.append(time.perf_counter() - t)
        finally:
            server.stop()
        print(f"restart {i}: {starts[-1]:.1f} s until the first answer", flush=True)
    model_bytes = dir_bytes(merged_dir)
    import shutil

    shutil.rmtree(work, ignore_errors=True)
    return {
        "mode": "restart",
        "merge_save_s": save_s,
        "starts_s": starts,
        "p50_s": median(starts),
        "p95_s": pct(starts, 95),
        "p50_with_merge_s": median(starts) + save_s,
        "wire_bytes": model_bytes,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=["student", "teacher"], default="student")
    p.add_argument("--pushes", type=int, default=10, help="timed pushes per mode (about 1 s each)")
    p.add_argument(
        "--warmup", type=int, default=1, help="first pushes per mode left out of p50/p95 (still reported)"
    )
    p.add_argument("--restarts", type=int, default=3)
    p.add_argument("--lora_r", type=int, default=16)
    p.add_argument("--lora_alpha", type=int, default=32)
    p.add_argument(
        "--decode_tokens",
        type=int,
        default=32,
        help="after the pushes, decode 32 prompts x this many tokens (0: skip)",
    )
    p.add_argument("--modes", default="merged,lora,restart")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    setup_process()
    modes = args.modes.split(",")

    student = demo_paths(with_data=False)[args.model]
    peft, tok, canary, states, msgs, pack_s = make_adapters(
        student, args.pushes + args.warmup, args.lora_r, args.lora_alpha, args.seed
    )
    prompts = [chat_ids(tok, t) for t in prompt_texts(32)]
    res: dict = {"settings": vars(args), "model_dir": str(student), "pack_s_median": median(pack_s)}
    for mode in ("merged", "lora"):
        if mode in modes:
            res[mode] = push_mode(mode, student, peft, canary, states, msgs, prompts, args)
    if "restart" in modes:
        res["restart"] = restart_mode(student, peft, tok, states[-1], args)
    for m in ("merged", "lora", "restart"):
        if m in res:
            print(
                f"{m}: p50 {res[m]['p50_s']:.3f} s, p95 {res[m]['p95_s']:.3f} s, {res[m]['wire_bytes'] / 1e6:.1f} MB on the wire"
            )
    labels = {
        "merged": "push -> serving p50, merged in place",
        "lora": "push -> serving p50, vLLM LoRA mode",
        "restart": "new weights serving p50, engine restart",
    }
    res["targets"] = [
        target(labels[m], res[m]["p50_s"], TARGET_P50_S, higher_is_better=False, unit=" s")
        for m in ("merged", "lora", "restart")
        if m in res
    ]
    write_result("sync", res, _markdown(res, args))
    return 0


def _markdown(res: dict, args) -> str:
    n = args.pushes
    rows = []
    labels = {"merged": "merged in place (ours, default)", "lora": "vLLM LoRA hot-load (`--sync_mode lora`)"}
    for m in ("merged", "lora"):
        if m in res:
            r = res[m]
            dec = r["decode_after_push"]
            rows.append(
                [
                    labels[m],
                    f"{r['p50_s'] * 1e3:.0f} ms",
                    f"{r['p95_s'] * 1e3:.0f} ms",
                    f"{r['reload_p50_s'] * 1e3:.0f} / {r['reload_p95_s'] * 1e3:.0f} ms",
                    f"{r['wire_bytes'] / 1e6:.1f} MB",
                    n,
                    f"{dec['tokens_per_s']:.0f}" if dec else "-",
                ]
            )
    if "restart" in res:
        r = res["restart"]
        rows.append(
            [
                "restart a fresh engine on a saved merged model (naive)",
                f"{r['p50_s']:.1f} s",
                f"{r['p95_s']:.1f} s",
                f"+ {r['merge_save_s']:.1f} s merge & save",
                f"{r['wire_bytes'] / 1e6:.0f} MB",
                len(r["starts_s"]),
                "-",
            ]
        )
    md = [
        "## 3. Weight sync: adapter push -> new weights serving\n",
        f"Model: the pruned demo student ({res['model_dir'].rsplit('/', 1)[-1]}), fp32 server on CPU. Adapters: PEFT LoRA r={args.lora_r}, "
        f"alpha={args.lora_alpha}, all linear projections, random lora_B per push, with the learner's 24-token canary. "
        f"Latency = client wall time from sending the push until the server's reply, which comes after the reload AND the canary "
        f"scoring; every canary was checked against HF+PEFT with the same adapter (max |Δ logprob| "
        f"{max(p['canary_max_abs'] for m in ('merged', 'lora') if m in res for p in res[m]['pushes']):.1e}), so each push verifiably "
        f"served new weights. p50/p95 over {n} pushes after {args.warmup} warm-up push(es); restarts: p50/p95 over {args.restarts} starts "
        "(with so few, p95 is close to the slowest).\n",
        table(
            [
                "mode",
                "p50",
                "p95",
                "server reload p50 / p95",
                "bytes on the wire",
                "n",
                "decode tokens/s after push",
            ],
            rows,
        ),
    ]
    for t in res["targets"]:
        md.append(
            f"- {t['line']}"
            + (" (the naive way, which in-place reload avoids)" if "restart" in t["what"] else "")
        )
    if "merged" in res and "restart" in res:
        md.append(
            f"- merged in place is **{res['restart']['p50_s'] / res['merged']['p50_s']:.0f}x** faster than a restart at p50 and moves "
            f"**{res['restart']['wire_bytes'] / res['merged']['wire_bytes']:.0f}x** fewer bytes"
        )
    if (
        "merged" in res
        and "lora" in res
        and res["merged"]["decode_after_push"]
        and res["lora"]["decode_after_push"]
    ):
        a, b = (
            res["merged"]["decode_after_push"]["tokens_per_s"],
            res["lora"]["decode_after_push"]["tokens_per_s"],
        )
        md.append(
            f"- decoding after the push (32 prompts x {args.decode_tokens} tokens): merged {a:.0f} tokens/s, lora {b:.0f} tokens/s "
            f"({a / b:.1f}x): vLLM applies the LoRA on every decode step, the merged mode pays once per push"
        )
    md.append(
        "- engine starts in this run: "
        + ", ".join(f"{m} {res[m]['engine_start_s']:.0f} s" for m in ("merged", "lora") if m in res)
    )
    md.append(f"- {load_note()}")
    return "\n".join(md) + "\n"


if __name__ == "__main__":
    sys.exit(main())
