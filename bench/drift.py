"""Benchmark: bf16 drift of the served policy, merged sync against vLLM LoRA sync.

    python -m bench.drift                 # 20 steps in each mode, the seed's lr and LoRA scale
    python -m bench.drift --steps 10 --lr 1e-3

In bf16, a merged push serves bf16(W0 + s*B*A): wherever s*B*A is under half a bf16 ulp of W0 it
rounds back to W0, so the server samples from an older policy than the one the learner trains
(early LoRA steps are small). vLLM's LoRA mode keeps the adapter apart and adds x*A*B at run time,
so small deltas survive. This measures it: one rollout server on the tiny student served in
bfloat16, the learner in float32 (the policy it trains is exact), every micro-batch on-policy
(lmbda 1), a push every step; per step, the learner's policy-mismatch figures (learner.mismatch:
mean |logprob learner - logprob server| over the sampled tokens, the k3 KL estimate, the share of
tokens with |d| > 0.5). The same run, seed and data in `merged` and in `lora` mode. A run the
learner stops on the mismatch bound (exit 2) is reported with the steps it made.

Before any push both modes serve bf16(W0); what grows after is the part of the mismatch that the
sync mode adds. Writes bench/out/drift.{json,md} and its section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from bench.common import (
    OUT,
    ROOT,
    read_rows,
    rollout_server,
    setup_process,
    table,
    tiny_pair,
    write_result,
    write_section,
)
from shared import procs

MODES = ("merged", "lora")
KEYS = ("mismatch/mean_abs_logprob", "mismatch/kl_k3", "mismatch/frac_abs_gt_0.5")


def run_mode(mode: str, paths, work: Path, args) -> dict:
    student, teacher, data = paths
    server = rollout_server(
        student, work / f"server-{mode}.log", dtype="bfloat16", sync_mode=mode, max_model_len=512
    )
    out = work / mode
    flags = {
        "model_name_or_path": student,
        "teacher_model_name_or_path": teacher,
        "dataset_name": data,
        "output_dir": out,
        "per_device_train_batch_size": args.batch,
        "gradient_accumulation_steps": 1,
        "max_steps": args.steps,
        "max_new_tokens": args.max_new_tokens,
        "max_length": 256,
        "lmbda": 1,
        "sync_steps": 1,
        "logging_steps": 1,
        "save_steps": 10_000,
        "learning_rate": args.lr,
        "use_peft": "true",  # TRL's default is full fine-tuning; the drift is about LoRA deltas
        "lora_r": args.lora_r,
        "lora_alpha": args.lora_alpha,
        "lora_target_modules": "all-linear",
        "torch_dtype": "float32",
        "seed": 3,
    }
    try:
        server.wait_ready()
        flags["rollout_url"] = server.url
        cmd = [sys.executable, "-m", "learner.cli"] + [
            x for k, v in flags.items() for x in (f"--{k}", str(v))
        ]
        log = work / f"learner-{mode}.log"
        proc = procs.start(cmd, log)
        try:
            code = proc.wait(args.timeout_s)
        finally:
            procs.stop(proc)
    finally:
        server.stop()
    rows = [r for r in read_rows(out / "metrics.jsonl") if KEYS[0] in r]
    weights = final_adapter_delta(student, out, args) if code == 0 else None
    last = procs.log_tail(log, 3).strip().splitlines()
    return {
        "exit_code": code,
        "last_line": last[-1] if last else "",
        "steps": [{"step": r["step"], **{k: r[k] for k in KEYS}} for r in rows],
        "final_adapter_in_bf16": weights,
    }


def final_adapter_delta(student: Path, out: Path, args) -> dict:
    """What a bf16 merge serves of the run's final adapter, weight by weight (bench.gpu_check.served_delta):
    the share of adapted weights that round back to bf16(W0), and the served delta's relative error."""
    from safetensors.torch import load_file

    from bench.gpu_check import served_delta

    base = load_file(str(student / "model.safetensors"))
    lora = load_file(str(out / "adapter_model.safetensors"))
    pairs = []
    for a_name, a in lora.items():
        if ".lora_A." not in a_name:
            continue
        b = lora[a_name.replace(".lora_A.", ".lora_B.")]
        w_name = a_name.removeprefix("base_model.model.").replace(".lora_A.weight", ".weight")
        pairs.append((base[w_name].float(), (args.lora_alpha / args.lora_r) * (b.float() @ a.float())))
    return served_delta(pairs)


def main(argv: list[str] | None = None) -> int:
    setup_process()
    p = argparse.ArgumentParser(prog="bench.drift", description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--max_new_tokens", type=int, default=32)
    p.add_argument("--lr", type=float, default=2e-4, help="default: the seed's")
    p.add_argument("--lora_r", type=int, default=64, help="default: the seed's (r64, alpha16)")
    p.add_argument("--lora_alpha", type=int, default=16)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--timeout_s", type=float, default=900)
    args = p.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="gkd-bench-drift-"))
    paths = tiny_pair(work, args.layers, args.hidden, args.layers + 1)
    res = {"settings": vars(args), "modes": {m: run_mode(m, paths, work, args) for m in MODES}}
    md = _markdown(res, args)
    write_result("drift", res, md)
    write_section(ROOT / "BENCHMARKS.md", md, "drift", "bf16 drift (`python -m bench.drift`)")
    return 0


def render(when: str, alone: bool = True) -> None:
    """Write the section again from bench/out/drift.json (a measurement taken at `when`)."""
    res = json.loads((OUT / "drift.json").read_text())
    args = argparse.Namespace(**res["settings"])
    md = _markdown(res, args)
    write_result("drift", res, md)
    write_section(
        ROOT / "BENCHMARKS.md", md, "drift", "bf16 drift (`python -m bench.drift`)", when=when, alone=alone
    )


def _markdown(res: dict, args) -> str:
    modes = res["modes"]
    by_step = {m: {r["step"]: r for r in modes[m]["steps"]} for m in MODES}
    steps = sorted(set().union(*[set(v) for v in by_step.values()]))

    def cell(m, s, k):
        r = by_step[m].get(s)
        return f"{r[k]:.2e}" if r else "-"

    rows = [[s] + [cell(m, s, k) for m in MODES for k in KEYS[:2]] for s in steps]
    head = ["step"] + [f"{m}: {k.split('/')[1]}" for m in MODES for k in KEYS[:2]]
    weights = "".join(
        f"\n- {m}'s final adapter merged into bf16 weights (what `merged` serves of it): "
        f"{w['fp32_pristine']['share_unchanged']:.0%} of the adapted weights round back to bf16(W0), "
        f"served delta relative error {w['fp32_pristine']['rel_err_of_served_delta']:.2f} "
        f"(from a bf16 pristine copy: {w['bf16_pristine']['share_unchanged']:.0%}, "
        f"{w['bf16_pristine']['rel_err_of_served_delta']:.2f}); `lora` serves it unmerged."
        for m in MODES
        if (w := modes[m].get("final_adapter_in_bf16"))
    )
    means = {m: sum(r[KEYS[0]] for r in modes[m]["steps"]) / max(1, len(modes[m]["steps"])) for m in MODES}
    first = {m: modes[m]["steps"][0][KEYS[0]] if modes[m]["steps"] else float("nan") for m in MODES}
    weights = (
        f"\n- mean |d| over the steps: merged {means['merged']:.3g}, lora {means['lora']:.3g}; at step 1 "
        f"(served from the first push of a zero-initialised LoRA, i.e. bf16(W0) in both modes): merged "
        f"{first['merged']:.3g}, lora {first['lora']:.3g}. Per token, serving the whole model in bf16 "
        "outweighs what either mode does to the delta at this lr; the weights show what merged loses:"
        + weights
    )
    ends = weights + "".join(
        f"\n- {m}: exit {modes[m]['exit_code']}, {len(modes[m]['steps'])} steps logged; the learner's last line: "
        f"`{modes[m]['last_line'][:200]}`"
        for m in MODES
    )
    return (
        "## bf16 drift: merged sync against vLLM LoRA sync\n\n"
        f"The tiny student ({args.layers} layers, hidden {args.hidden}) served in bfloat16, the learner in "
        f"float32; lr {args.lr:g}, LoRA r{args.lora_r} alpha {args.lora_alpha} on all linear layers, batch "
        f"{args.batch}, {args.max_new_tokens} new tokens, lmbda 1, a push every step. Per step: mean "
        "|logprob learner - logprob server| over the sampled tokens and the k3 estimate of KL(server || learner).\n\n"
        + table(head, rows)
        + ends
        + "\n"
    )


if __name__ == "__main__":
    raise SystemExit(main())
