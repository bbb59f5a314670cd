"""Benchmark: a teacher on its own vLLM engine (`--teacher_url`) against the learner's local teacher.

Four learner runs with the same seed, steps and settings against one student rollout server:
the local full-vocabulary teacher (`--loss_type jsd`), a teacher server at top-k 20 and at
top-k 100 (top-k + tail JSD), and the sampled-token reverse KL (`--loss_type sampled_rkl`, lmbda
1). Every run samples and computes its loss at temperature 1 (a teacher server scores at 1).

- Gap closed: the full-vocabulary generalized JSD(beta) of the student to the teacher on held-out
  prompts with teacher-written completions (HF teacher samples, seeded), before and after, computed
  here for every run the same way (`learner.evaluate.divergences` with the HF teacher): (before -
  after) / before. Target for k = 20: within 10% (relative) of the local run's gap closed.
- Learner peak RSS (VmHWM, sampled every 0.2 s) with the local teacher and with a teacher server.
- Teacher scoring throughput, completion positions per second on the same sequences: the teacher
  server's `score` (vLLM prompt logprobs, top-k 20) against the learner's local HF teacher forward
  (fp32, micro-batches of `--batch`, `torch_num_threads` threads).

Models (`--models`): `embedded` (the default) is the demo's pair, prepared by demo.prepare into
demo-output/ (cached, shared with `make demo`): SmolLM2-135M-Instruct as the teacher and its
layer-pruned copy as the student, trained on the demo's train split with the demo's LoRA (r64,
all-linear) and scored on its held-out split's teacher-written completions. `tiny` is the test pair
from shared.tiny made wider and deeper (`--layers`, `--hidden`), as in bench.staleness, for a smoke
run. `python -m bench.remote_teacher`; writes bench/out/remote_teacher.{json,md}.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from bench.common import (
    ROOT,
    PeakRss,
    chat_ids,
    read_rows,
    rollout_server,
    setup_process,
    table,
    target,
    tiny_pair,
    write_result,
    write_section,
)
from shared import procs

RUNS = [  # (name, extra learner flags)
    ("local", {"loss_type": "jsd"}),
    ("remote_k20", {"loss_type": "jsd", "teacher_topk": 20}),
    ("remote_k100", {"loss_type": "jsd", "teacher_topk": 100}),
    ("sampled_rkl", {"loss_type": "sampled_rkl", "lmbda": 1.0}),
]


# The demo's LoRA and learning rate (demo/demo.yaml); the tiny pair keeps the smaller adapter below.
EMBEDDED_FLAGS = {"use_peft": "true", "lora_r": 64, "lora_alpha": 128, "lora_target_modules": "all-linear"}
TINY_FLAGS = {"use_peft": "true", "lora_r": 16, "lora_alpha": 32}  # use_peft: TRL's default is off


def build_embedded() -> tuple[Path, Path, Path]:
    """The demo's teacher, pruned student and teacher-written data (demo.prepare, cached in demo-output/)."""
    from demo import prepare as P

    data, eval_samples = P.settings_from_config(ROOT / "demo" / "demo.yaml")
    prep = P.prepare(ROOT / "demo-output", data=data, eval_samples=eval_samples)
    return prep.student, prep.teacher, prep.data


def run_learner(name: str, extra: dict, paths, url: str, teacher_url: str, work: Path, args) -> dict:
    student, teacher, data = paths
    out = work / name
    flags = {
        "model_name_or_path": student,
        "dataset_name": data,
        "output_dir": out,
        "rollout_url": url,
        "per_device_train_batch_size": args.batch,
        "gradient_accumulation_steps": args.accum,
        "max_steps": args.steps,
        "max_new_tokens": args.max_new_tokens,
        "max_length": 256,
        "lmbda": args.lmbda,
        "beta": args.beta,
        "temperature": 1.0,
        "loss_temperature": 1.0,
        "logging_steps": 1,
        "save_steps": 10_000,
        "learning_rate": args.lr,
        **(EMBEDDED_FLAGS if args.models == "embedded" else TINY_FLAGS),
        "torch_dtype": "float32",
        "torch_num_threads": args.threads,
        "seed": 3,
        **extra,
    }
    if name == "local":
        flags["teacher_model_name_or_path"] = teacher
    else:
        flags["teacher_url"] = teacher_url
    cmd = [sys.executable, "-m", "learner.cli"]
    for k, v in flags.items():
        cmd += [f"--{k}", str(v)]
    log = work / f"learner-{name}.log"
    proc = procs.start(cmd, log)
    rss = PeakRss(proc.pid)
    t0 = time.monotonic()
    try:
        while proc.poll() is None:
            rss.sample()
            if time.monotonic() - t0 > args.timeout_s:
                raise RuntimeError(f"learner {name} ran past {args.timeout_s:g}s")
            time.sleep(0.2)
        if proc.returncode != 0:
            raise RuntimeError(f"learner {name} failed:\n{procs.log_tail(log)}")
    finally:
        procs.stop(proc)
    rows = [r for r in read_rows(out / "metrics.jsonl") if "loss" in r and "event" not in r]
    return {
        "adapter": out,
        "peak_rss_mib": rss.kib / 1024,
        "wall_s": time.monotonic() - t0,
        "rows": len(rows),
    }


def heldout(paths, args):
    """Held-out prompts (never trained on) and teacher-written completions for them.

    embedded: the demo's held-out split, whose completions the teacher wrote in demo.prepare; tiny:
    rows past the training set, completed here by seeded HF teacher samples."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from learner.data import detect_shape, to_examples
    from learner.rollouts import hf_generate
    from shared.tiny import write_dataset

    student, teacher, _ = paths
    tok = AutoTokenizer.from_pretrained(str(student))
    t_model = AutoModelForCausalLM.from_pretrained(str(teacher), dtype=torch.float32).eval()
    if args.models == "embedded":
        rows = read_rows(paths[2] / "heldout.jsonl")[: args.eval_prompts]
        limit = 256 - args.max_new_tokens
        ex, _ = to_examples(rows, detect_shape(rows[0].keys(), "heldout"), tok, limit, 256, "truncate")
        return tok, t_model, [e.prompt_ids for e in ex], [e.completion_ids for e in ex]
    rows = read_rows(write_dataset(paths[2].parent / "heldout.jsonl", n=args.eval_prompts, seed=11))
    prompts = [chat_ids(tok, r["prompt"]) for r in rows]
    comps = hf_generate(
        t_model,
        prompts,
        pad_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
        eos_id=tok.eos_token_id,
        temperature=1.0,
        max_new_tokens=args.max_new_tokens,
        device=torch.device("cpu"),
        seed=5,
    )
    return tok, t_model, prompts, comps


def full_jsd(student_dir: Path, adapter: Path | None, t_model, tok, prompts, comps, args) -> float:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from learner.evaluate import divergences

    model = AutoModelForCausalLM.from_pretrained(str(student_dir), dtype=torch.float32)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, str(adapter))
    model.eval()
    d = divergences(
        model,
        t_model,
        prompts,
        comps,
        beta=args.beta,
        vocab=model.get_output_embeddings().weight.shape[0],
        pad_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
        max_length=256,
        batch_size=args.batch,
        device=torch.device("cpu"),
    )
    return d["jsd"]


def scoring_throughput(teacher_url: str, t_model, prompts, comps, args) -> dict:
    """Completion positions per second: the teacher server's score vs the HF teacher forward."""
    import torch

    from learner.step import collate, completion_logits
    from shared.messages import ScoreRequest, ScoreSequence
    from shared.transport import connect

    pairs = [(p, c) for p, c in zip(prompts, comps) if c]
    positions = sum(len(c) for _, c in pairs)
    client = connect(teacher_url, timeout_s=600)
    try:
        seqs = [ScoreSequence(prompt_ids=p, completion_ids=c) for p, c in pairs]
        client.score(ScoreRequest(request_id="warm", sequences=seqs[:2], k=20))
        t0 = time.perf_counter()
        for i in range(0, len(seqs), args.batch):
            client.score(ScoreRequest(request_id=f"s{i}", sequences=seqs[i : i + args.batch], k=20))
        vllm_s = time.perf_counter() - t0
    finally:
        client.close()
    torch.set_num_threads(args.threads)
    vocab = t_model.get_output_embeddings().weight.shape[0]
    with torch.no_grad():
        warm = collate([pairs[0][0]], [pairs[0][1]], 0, 256)
        completion_logits(t_model, warm, vocab)
        t0 = time.perf_counter()
        for i in range(0, len(pairs), args.batch):
            chunk = pairs[i : i + args.batch]
            batch = collate([p for p, _ in chunk], [c for _, c in chunk], 0, 256)
            completion_logits(t_model, batch, vocab)
        hf_s = time.perf_counter() - t0
    return {
        "positions": positions,
        "vllm_positions_per_s": positions / vllm_s,
        "hf_positions_per_s": positions / hf_s,
    }


def main(argv: list[str] | None = None) -> int:
    setup_process()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", choices=["embedded", "tiny"], default="embedded")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--accum", type=int, default=2)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--lmbda", type=float, default=0.5)
    p.add_argument("--beta", type=float, default=0.5)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument(
        "--max_new_tokens", type=int, default=None, help="default: 64 embedded (the demo's), 32 tiny"
    )
    p.add_argument(
        "--eval_prompts", type=int, default=None, help="default: 40 embedded (the demo's), 32 tiny"
    )
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--runs", nargs="+", default=[n for n, _ in RUNS], choices=[n for n, _ in RUNS])
    p.add_argument("--timeout_s", type=float, default=1200)
    args = p.parse_args(argv)
    embedded = args.models == "embedded"
    args.max_new_tokens = args.max_new_tokens or (64 if embedded else 32)
    args.eval_prompts = args.eval_prompts or (40 if embedded else 32)
    work = Path(tempfile.mkdtemp(prefix="gkd-bench-remote-teacher-"))
    paths = (
        build_embedded()
        if args.models == "embedded"
        else tiny_pair(work, args.layers, args.hidden, args.layers + 2)
    )
    server = rollout_server(paths[0], work / "server.log", max_model_len=512)
    teacher = rollout_server(
        paths[1], work / "teacher.log", max_model_len=512, role="teacher", max_logprobs=128
    )
    res: dict = {"settings": vars(args), "runs": {}}
    try:
        server.wait_ready()
        teacher.wait_ready()
        tok, t_model, prompts, comps = heldout(paths, args)
        res["jsd_before"] = before = full_jsd(paths[0], None, t_model, tok, prompts, comps, args)
        for name, extra in RUNS:
            if name not in args.runs:
                continue
            run = run_learner(name, extra, paths, server.url, teacher.url, work, args)
            run["jsd_after"] = full_jsd(paths[0], run.pop("adapter"), t_model, tok, prompts, comps, args)
            run["gap_closed"] = (before - run["jsd_after"]) / before
            res["runs"][name] = run
            print(name, run, flush=True)
        res["scoring"] = scoring_throughput(teacher.url, t_model, prompts, comps, args)
    finally:
        teacher.stop()
        server.stop()
    runs = res["runs"]
    targets = []
    if "local" in runs and "remote_k20" in runs:
        rel = runs["remote_k20"]["gap_closed"] / runs["local"]["gap_closed"]
        targets.append(target("k=20 gap closed / local full-vocabulary gap closed", rel, 0.9))
    res["targets"] = targets
    a = args
    md = (
        "## Remote teacher (`--teacher_url`)\n\n"
        + (
            f"Models: {a.models}; {a.steps} steps of batch {a.batch} x accumulation {a.accum}, lmbda {a.lmbda}, "
            f"beta {a.beta}, lr {a.lr}, max_new_tokens {a.max_new_tokens}, seed 3; held-out: {a.eval_prompts} prompts.\n\n"
        )
        + table(
            ["run", "held-out JSD after", "gap closed", "learner peak RSS (MiB)", "wall (s)"],
            [[n, r["jsd_after"], r["gap_closed"], r["peak_rss_mib"], r["wall_s"]] for n, r in runs.items()],
        )
    )
    sc = res["scoring"]
    md += (
        f"\nHeld-out JSD before: {before:.4f}. Teacher scoring, {sc['positions']} positions: vLLM teacher server "
        f"{sc['vllm_positions_per_s']:.0f} positions/s, local HF forward {sc['hf_positions_per_s']:.0f} positions/s.\n"
    )
    md += "".join(f"\n- {t['line']}" for t in targets) + "\n"
    write_result("remote_teacher", res, md)
    write_section(
        ROOT / "BENCHMARKS.md", md, "remote_teacher", "A teacher server (`python -m bench.remote_teacher`)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
