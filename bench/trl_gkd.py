"""The peer: TRL's GKDTrainer (trl.experimental.gkd) run as the seed script runs it, for a wall budget.

    python -m bench.trl_gkd --student S --teacher T --data DIR --out OUT --budget_s 240 [--gradient_checkpointing true]

Only instrumentation is added, nothing is replaced: a TrainerCallback records the wall time of every
optimizer step, snapshots the LoRA adapter every `--snap_every_s` seconds (PEFT names, the same
tensors our learner checkpoints) and stops training once the budget is spent; a thin wrapper around
`compute_loss` counts the completion tokens in the loss, and one around `generate_on_policy_outputs`
times the on-policy sampling. Writes OUT/run.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from bench.common import add_run_settings


def _bool(s: str) -> bool:
    return s.lower() in ("1", "true", "yes", "on")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--student", required=True)
    p.add_argument("--teacher", required=True)
    p.add_argument(
        "--data", required=True, help="directory with train.jsonl (conversational prompt/completion rows)"
    )
    p.add_argument("--out", required=True)
    p.add_argument("--budget_s", type=float, default=240.0, help="training wall time, from the first step")
    p.add_argument("--snap_every_s", type=float, default=0.0, help="adapter snapshot interval (0: none)")
    add_run_settings(p)  # batch, accum, lr, LoRA r/alpha, lmbda, beta, temperature, max_new_tokens: as ours
    p.add_argument("--lora_dropout", type=float, default=0.05)
    p.add_argument("--max_length", type=int, default=1024)
    p.add_argument("--gradient_checkpointing", type=_bool, default=True)
    p.add_argument("--seed", type=int, default=42)
    return p


def load_messages(data_dir: Path) -> list[dict]:
    """TRL's ChatML collator wants one `messages` list per row: prompt turns + the assistant answer."""
    rows = [json.loads(x) for x in (data_dir / "train.jsonl").read_text().splitlines() if x.strip()]
    return [{"messages": r["prompt"] + r["completion"]} for r in rows]


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    t_spawn = time.time()
    from bench.common import setup_process

    setup_process()
    import torch
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model_state_dict
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    # As the seed script: left padding, pad = eos when missing, use_cache off under checkpointing.
    tok = AutoTokenizer.from_pretrained(args.student, padding_side="left")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    student = AutoModelForCausalLM.from_pretrained(
        args.student, dtype=torch.float32, use_cache=not args.gradient_checkpointing
    )
    teacher = AutoModelForCausalLM.from_pretrained(args.teacher, dtype=torch.float32, use_cache=True)
    cfg = GKDConfig(
        output_dir=str(out / "trainer"),
        per_device_train_batch_size=args.batch,
        gradient_accumulation_steps=args.accum,
        learning_rate=args.lr,
        lr_scheduler_type="constant",
        max_steps=1_000_000,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        gradient_checkpointing=args.gradient_checkpointing,
        lmbda=args.lmbda,
        beta=args.beta,
        temperature=args.temperature,
        max_new_tokens=args.max_new_tokens,
        max_length=args.max_length,
        seed=args.seed,
        use_cpu=True,
        dataloader_num_workers=0,
        disable_dropout=True,
        bf16=False,
        disable_tqdm=True,
    )
    peft_cfg = LoraConfig(
        r=args.lora_r,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        target_modules="all-linear",
        task_type="CAUSAL_LM",
    )
    trainer = GKDTrainer(
        model=student,
        teacher_model=teacher,
        args=cfg,
        train_dataset=Dataset.from_list(load_messages(Path(args.data))),
        processing_class=tok,
        peft_config=peft_cfg,
    )
    rec = {"settings": vars(args), "steps": [], "snapshots": [], "generate_s": 0.0, "on_policy": 0}
    tokens = {"n": 0}

    orig_loss = trainer.compute_loss

    def counting_loss(model, inputs, return_outputs=False, num_items_in_batch=None):
        tokens["n"] += int((inputs["labels"][:, 1:] != -100).sum())
        return orig_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)

    orig_gen = trainer.generate_on_policy_outputs

    def timed_generate(model, inputs, generation_config):
        t = time.perf_counter()
        try:
            return orig_gen(model, inputs, generation_config)
        finally:
            rec["generate_s"] += time.perf_counter() - t
            rec["on_policy"] += 1

    trainer.compute_loss = counting_loss
    trainer.generate_on_policy_outputs = timed_generate

    def snapshot(step: int, t: float) -> None:
        d = out / "snapshots" / f"step-{step}"
        d.mkdir(parents=True, exist_ok=True)
        tensors = {
            k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(trainer.model).items()
        }
        save_file(tensors, str(d / "adapter_model.safetensors"))
        rec["snapshots"].append({"step": step, "t": t, "path": str(d)})

    class Clock(TrainerCallback):
        def on_train_begin(self, a, state, control, **kw):
            self.t0 = time.time()
            rec["t_train_begin"] = self.t0
            rec["setup_s"] = self.t0 - t_spawn
            self.next_snap = args.snap_every_s

        def on_step_begin(self, a, state, control, **kw):
            self.ts, self.tokens0 = time.time(), tokens["n"]

        def on_step_end(self, a, state, control, **kw):
            now = time.time()
            rec["steps"].append(
                {
                    "step": state.global_step,
                    "t": now - self.t0,
                    "seconds": now - self.ts,
                    "tokens": tokens["n"] - self.tokens0,
                }
            )
            # Stop where the next step would end more than half a step past the budget: TRL's steps are
            # long here, and stopping only once past the budget would overshoot by up to a whole step.
            done = now - self.t0 + 0.5 * (now - self.ts) >= args.budget_s
            if args.snap_every_s and (now - self.t0 >= self.next_snap or done):
                snapshot(state.global_step, now - self.t0)
                while self.next_snap <= now - self.t0:
                    self.next_snap += args.snap_every_s
            if done:
                control.should_training_stop = True

    trainer.add_callback(Clock())
    trainer.train()
    rec["peak_rss_note"] = "see the bench._peak file"
    (out / "run.json").write_text(json.dumps(rec, indent=1))
    print(
        f"TRL: {len(rec['steps'])} steps in {rec['steps'][-1]['t'] if rec['steps'] else 0:.0f} s, {tokens['n']} tokens",
        flush=True,
    )


if __name__ == "__main__":
    main()
