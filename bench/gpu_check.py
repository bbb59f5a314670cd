"""A prepared GPU check: the learner's numbers on one GPU, with no model hub and no vLLM.

    python -m bench.gpu_check                 # Qwen2-0.5B student, Qwen2-1.5B teacher, on CUDA
    python -m bench.gpu_check --tiny          # tiny shapes, any device (the CPU smoke test)

The lent GPU machine has torch, transformers, peft and accelerate, but not vLLM, TRL, msgspec or a
network, so this imports only torch, transformers, peft and the learner's pure modules (learner.step,
learner.loss, learner.mismatch). Models are built from the configs in bench/configs/ (Qwen2-0.5B and
Qwen2-1.5B shapes) with random weights. It reports, as one JSON object (stdout and --out):

- ``train``: `--steps` learner optimizer steps in bf16 with the seed's settings (batch 4, LoRA r64
  alpha 16 on all linear layers, gradient checkpointing, AdamW lr 2e-5), on completions the teacher
  wrote once at the start (standing in for rollouts): seconds per step (median after the first) and
  peak device memory;
- ``loss``: our generalized JSD against TRL's ``generalized_jsd_loss`` at N tokens x V (4096 x
  151,936; fp32 inputs, forward + backward): loss values, max |grad difference|, median time and
  extra peak memory of each. TRL is used when importable; otherwise a line-for-line transcription of
  its function (trl 1.16, ``GKDTrainer.generalized_jsd_loss``), marked ``"trl": "transcribed"``;
- ``merge_drift``: on the student's q_proj weights (bf16, as vLLM serves them), a LoRA delta of the
  size early training produces, merged two ways: in bf16 (W_bf16 + delta) and in fp32 from a fp32
  pristine copy then cast. Reported: the share of weights whose bf16 merge equals W (the delta lost
  to rounding) and the relative error of each merge against the exact fp32 sum.

Peak memory is ``torch.cuda.max_memory_allocated`` on CUDA; on CPU it is not measured (null).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

CONFIGS = Path(__file__).resolve().parent / "configs"
TINY = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2
)


def _config(name: str, tiny: bool):
    from transformers import Qwen2Config

    d = json.loads((CONFIGS / f"{name}.json").read_text())
    if tiny:
        d.update(TINY, vocab_size=512, max_position_embeddings=1024, bos_token_id=1, eos_token_id=2)
    return Qwen2Config(**d)


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_reset(device) -> int | None:
    import torch

    if device.type != "cuda":
        return None
    _sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    return torch.cuda.memory_allocated(device)


def _peak_gb(device, base: int | None = 0) -> float | None:
    import torch

    if device.type != "cuda":
        return None
    _sync(device)
    return (torch.cuda.max_memory_allocated(device) - (base or 0)) / 1e9


def check_train(
    device, *, tiny: bool, steps: int, prompt_len: int, new_tokens: int, dtype=None
) -> dict[str, Any]:
    """Seed-shaped optimizer steps (one micro-batch of 4 each), in bf16 unless `dtype` says otherwise."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from learner.step import collate, distill_loss

    torch.manual_seed(0)
    dtype = dtype or torch.bfloat16
    student = AutoModelForCausalLM.from_config(_config("qwen2-0.5b", tiny), dtype=dtype).to(device)
    teacher = AutoModelForCausalLM.from_config(_config("qwen2-1.5b", tiny), dtype=dtype).to(device)
    teacher.eval().requires_grad_(False)
    vocab = student.config.vocab_size
    batch = 4
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, vocab, (prompt_len,), generator=gen).tolist() for _ in range(batch)]
    with torch.no_grad():  # teacher-written completions stand in for rollouts
        out = teacher.generate(
            torch.tensor(prompts, device=device),
            attention_mask=torch.ones(batch, prompt_len, dtype=torch.long, device=device),
            do_sample=True,
            temperature=0.9,
            top_k=0,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            pad_token_id=0,
        )
    completions = out[:, prompt_len:].tolist()
    student.config.use_cache = False
    student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    student.enable_input_require_grads()
    student = get_peft_model(
        student,
        LoraConfig(r=64, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM"),
    )
    params = [p for p in student.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=2e-5)
    b = collate(prompts, completions, pad_id=0, max_length=prompt_len + new_tokens).to(device)
    base = _peak_reset(device)
    times, losses = [], []
    for _ in range(steps):
        t0 = time.perf_counter()
        loss = distill_loss(student, teacher, b, vocab=vocab, beta=0.5, temperature=0.9)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        _sync(device)
        times.append(time.perf_counter() - t0)
        losses.append(loss.item())
    return {
        "student": "qwen2-0.5b" + (" (tiny)" if tiny else ""),
        "teacher": "qwen2-1.5b" + (" (tiny)" if tiny else ""),
        "steps": steps,
        "tokens_per_step": b.n_tokens,
        "s_per_step": statistics.median(times[1:] or times),
        "first_step_s": times[0],
        "peak_gb": _peak_gb(device),
        "peak_gb_above_models": _peak_gb(device, base),
        "losses": losses,
        "trainable_params": sum(p.numel() for p in params),
    }


def trl_jsd(student_logits, teacher_logits, labels=None, beta=0.5, temperature=1.0, reduction="batchmean"):
    """TRL's generalized_jsd_loss (trl 1.16), transcribed for machines without TRL."""
    import torch
    import torch.nn.functional as F

    student_log_probs = F.log_softmax(student_logits / temperature, dim=-1)
    teacher_log_probs = F.log_softmax(teacher_logits / temperature, dim=-1)
    if beta == 0:
        jsd = F.kl_div(student_log_probs, teacher_log_probs, reduction="none", log_target=True)
    elif beta == 1:
        jsd = F.kl_div(teacher_log_probs, student_log_probs, reduction="none", log_target=True)
    else:
        b = torch.tensor(beta, dtype=student_log_probs.dtype, device=student_log_probs.device)
        mixture = torch.logsumexp(
            torch.stack([student_log_probs + torch.log1p(-b), teacher_log_probs + torch.log(b)]), dim=0
        )
        kl_teacher = F.kl_div(mixture, teacher_log_probs, reduction="none", log_target=True)
        kl_student = F.kl_div(mixture, student_log_probs, reduction="none", log_target=True)
        jsd = b * kl_teacher + (1 - b) * kl_student
    if labels is not None:
        mask = labels != -100
        jsd = jsd[mask]
    if reduction == "batchmean":
        return jsd.sum() / mask.sum() if labels is not None else jsd.sum() / jsd.size(0)
    if reduction == "sum":
        return jsd.sum()
    if reduction == "mean":
        return jsd.mean()
    return jsd


def _trl_loss():
    try:
        from trl.experimental.gkd import GKDTrainer
    except ImportError:
        return trl_jsd, "transcribed"
    return GKDTrainer.generalized_jsd_loss, "trl"


def check_loss(device, *, n: int, v: int, reps: int = 3) -> dict[str, Any]:
    import torch

    from learner.loss import generalized_jsd_loss

    trl_fn, trl_kind = _trl_loss()
    gen = torch.Generator(device=device).manual_seed(0)
    s = torch.randn(1, n, v, device=device, generator=gen)
    t = torch.randn(1, n, v, device=device, generator=gen)
    labels = torch.zeros(1, n, dtype=torch.long, device=device)
    out: dict[str, Any] = {"n": n, "v": v, "dtype": "float32", "trl_impl": trl_kind}
    grads = {}
    for name, fn in (("ours", generalized_jsd_loss), ("trl", trl_fn)):
        x = s.clone().requires_grad_(True)
        base = _peak_reset(device)
        times = []
        for _ in range(reps + 1):
            x.grad = None
            t0 = time.perf_counter()
            loss = fn(x, t, labels=labels, beta=0.5, temperature=0.9)
            loss.backward()
            _sync(device)
            times.append(time.perf_counter() - t0)
        out[name] = {
            "loss": loss.item(),
            "median_s": statistics.median(times[1:]),
            "extra_peak_gb": _peak_gb(device, base),
        }
        grads[name] = x.grad
        del x
    out["loss_abs_diff"] = abs(out["ours"]["loss"] - out["trl"]["loss"])
    out["grad_max_abs_diff"] = float((grads["ours"] - grads["trl"]).abs().max())
    return out


def check_merge_drift(
    device, *, tiny: bool, r: int = 64, alpha: float = 16.0, b_std: float = 1e-4
) -> dict[str, Any]:
    """How much of a small LoRA delta survives when the merged weights are served in bf16.

    W0 is the student's fp32 q_proj weights; delta = (alpha / r) B A with A ~ N(0, 1/in) and B ~
    N(0, b_std^2) (B starts at 0 and moves by ~lr per step). Two merges, as the server can do them:
    from a bf16 pristine copy (bf16(W0) + bf16(delta)) and from a fp32 pristine copy (bf16(W0 +
    delta), the server's default). For each: the share of weights equal to bf16(W0) (delta lost to
    rounding) and the relative error of the served delta (merged - bf16(W0)) against delta.
    """
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(_config("qwen2-0.5b", tiny), dtype=torch.float32)
    ws = [layer.self_attn.q_proj.weight.detach().to(device) for layer in model.model.layers]
    scale = alpha / r
    gen = torch.Generator(device=device).manual_seed(1)
    pairs = []
    for w32 in ws:
        a = torch.randn(r, w32.shape[1], device=device, generator=gen) / w32.shape[1] ** 0.5
        b = torch.randn(w32.shape[0], r, device=device, generator=gen) * b_std
        pairs.append((w32, scale * (b @ a)))
    return {
        "weights": "q_proj of every layer",
        "lora_r": r,
        "lora_alpha": alpha,
        "lora_b_std": b_std,
        **served_delta(pairs),
    }


def served_delta(pairs) -> dict[str, dict[str, float]]:
    """For (fp32 W0, fp32 delta) pairs: what a bf16 server serves of each delta, merged from a bf16
    pristine copy (bf16(W0) + bf16(delta)) and from a fp32 one (bf16(W0 + delta)): the share of
    weights equal to bf16(W0) (the delta rounded away) and the relative error of the served delta
    (merged - bf16(W0)) against delta (RMS over the pairs)."""
    import torch

    sums = {"bf16_pristine": [0, 0.0], "fp32_pristine": [0, 0.0]}
    total = 0
    for w32, delta in pairs:
        base = w32.to(torch.bfloat16)
        merged = {
            "bf16_pristine": base + delta.to(torch.bfloat16),
            "fp32_pristine": (w32 + delta).to(torch.bfloat16),
        }
        for k, m in merged.items():
            sums[k][0] += int((m == base).sum())
            sums[k][1] += float(((m.float() - base.float() - delta).norm() / delta.norm()) ** 2)
        total += w32.numel()
    return {
        k: {"share_unchanged": same / total, "rel_err_of_served_delta": (err / len(pairs)) ** 0.5}
        for k, (same, err) in sums.items()
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(prog="python -m bench.gpu_check", description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="tiny shapes (a smoke test on any device)")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cuda or cpu")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps (default 10; 2 with --tiny)")
    p.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    args = p.parse_args(argv)
    import torch

    device = torch.device(
        ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    )
    if device.type == "cpu" and not args.tiny:
        p.error("the full check needs a GPU (--device cuda); use --tiny on CPU")
    steps = args.steps or (2 if args.tiny else 10)
    t0 = time.perf_counter()
    report: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "tiny": args.tiny,
        "train": check_train(
            device,
            tiny=args.tiny,
            steps=steps,
            prompt_len=16 if args.tiny else 64,
            new_tokens=16 if args.tiny else 128,
        ),
    }
    if device.type == "cuda":
        torch.cuda.empty_cache()
    report["loss"] = check_loss(device, n=64 if args.tiny else 4096, v=512 if args.tiny else 151_936)
    report["merge_drift"] = check_merge_drift(device, tiny=args.tiny)
    report["wall_s"] = time.perf_counter() - t0
    text = json.dumps(report, indent=2)
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
