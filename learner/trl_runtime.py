"""TRL's training settings, applied: precision, optimizer, schedule, reporters, quantization.

The flags are TRL's (HF TrainingArguments / TRL ModelConfig names and meanings; shared/trl_flags.py
classifies them all); this module turns them into torch objects for learner.recipe:

* `--bf16` / `--fp16`: mixed precision as HF Trainer does it, autocast around the forward passes
  with the weights kept in --torch_dtype (fp16 needs CUDA: CPU autocast has no fp16 grad scaler);
* `--tf32`: TF32 matmuls on CUDA;
* `--optim adamw_torch | adamw_torch_fused` with `--adam_beta1/2`, `--adam_epsilon`, `--weight_decay`;
* `--lr_scheduler_type` + `--lr_scheduler_kwargs`, warmup from `--warmup_steps` (a count, or a share
  of the steps below 1) or `--warmup_ratio`;
* `--report_to`: tensorboard, wandb, trackio (when installed), none, all; metrics.jsonl always;
* `--load_in_4bit` / `--load_in_8bit`: bitsandbytes quantization of the student, CUDA only.

Each setting that cannot work here is one line (UserError) before any model loads.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
from typing import Any

import torch

from learner.errors import UserError
from shared.config import Config, scheduler_kwargs, warmup_steps

log = logging.getLogger("gkd.learner")


def check(cfg: Config, device: torch.device) -> None:
    """The cheap checks of the TRL settings for this device and these installed packages."""
    t, m = cfg.train, cfg.model
    if t.fp16 and device.type != "cuda":
        raise UserError(
            f"--fp16: not supported on device {device.type}: fp16 mixed precision needs CUDA; use --bf16"
        )
    for flag, on in (("load_in_4bit", m.load_in_4bit), ("load_in_8bit", m.load_in_8bit)):
        if not on:
            continue
        if device.type != "cuda":
            raise UserError(
                f"--{flag}: not supported on device {device.type}: bitsandbytes quantization needs a CUDA device "
                "(train the LoRA on the unquantized student instead: drop the flag)"
            )
        if importlib.util.find_spec("bitsandbytes") is None:
            raise UserError(f"--{flag}: the bitsandbytes package is not installed (pip install bitsandbytes)")
    for name in reporters(cfg):
        if name in ("wandb", "trackio") and importlib.util.find_spec(name) is None:
            raise UserError(
                f"--report_to {name}: the {name} package is not installed (pip install {name}); "
                "use --report_to tensorboard or none (metrics.jsonl is written either way)"
            )


def reporters(cfg: Config) -> list[str]:
    """The --report_to integrations to use ("all": those installed)."""
    names = [r for r in cfg.train.report_to if r != "none"]
    if "all" in names:
        names = ["tensorboard"] + [n for n in ("wandb", "trackio") if importlib.util.find_spec(n)]
    return list(dict.fromkeys(names))


def apply_precision(cfg: Config) -> None:
    if cfg.train.tf32 is not None and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = bool(cfg.train.tf32)
        torch.backends.cudnn.allow_tf32 = bool(cfg.train.tf32)


def autocast(cfg: Config, device: torch.device):
    """The forward passes' mixed-precision context (a no-op without --bf16 / --fp16)."""
    if cfg.train.bf16:
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    if cfg.train.fp16:
        return torch.autocast(device_type=device.type, dtype=torch.float16)
    return contextlib.nullcontext()


def optimizer(cfg: Config, params: list[torch.nn.Parameter], device: torch.device) -> torch.optim.Optimizer:
    t = cfg.train
    kw: dict[str, Any] = dict(
        lr=t.learning_rate,
        betas=(t.adam_beta1, t.adam_beta2),
        eps=t.adam_epsilon,
        weight_decay=t.weight_decay,
    )
    fused = t.optim == "adamw_torch_fused" and all(p.dtype.is_floating_point for p in params)
    if fused and device.type in ("cuda", "cpu"):
        kw["fused"] = True
    return torch.optim.AdamW(params, **kw)


def scheduler(cfg: Config, opt: torch.optim.Optimizer, total: int):
    from transformers import get_scheduler

    warmup = warmup_steps(cfg, total)
    kind = cfg.train.lr_scheduler_type
    name = "constant_with_warmup" if kind == "constant" and warmup else kind
    return get_scheduler(
        name,
        opt,
        num_warmup_steps=warmup,
        num_training_steps=total,
        scheduler_specific_kwargs=scheduler_kwargs(cfg) or None,
    )


def quantization_kwargs(cfg: Config) -> dict[str, Any]:
    """from_pretrained keywords for --load_in_4bit / --load_in_8bit (empty without them)."""
    m = cfg.model
    if not (m.load_in_4bit or m.load_in_8bit):
        return {}
    from transformers import BitsAndBytesConfig

    compute = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(m.torch_dtype, torch.float32)
    q = BitsAndBytesConfig(
        load_in_4bit=m.load_in_4bit,
        load_in_8bit=m.load_in_8bit,
        bnb_4bit_compute_dtype=compute,
        bnb_4bit_quant_type=m.bnb_4bit_quant_type,
        bnb_4bit_use_double_quant=m.use_bnb_nested_quant,
        bnb_4bit_quant_storage=m.bnb_4bit_quant_storage or "uint8",
    )
    return {"quantization_config": q, "device_map": {"": torch.cuda.current_device()}}


class Reporters:
    """wandb / trackio sinks beside metrics.jsonl and TensorBoard (learner.metrics)."""

    def __init__(self, cfg: Config, enabled: bool):
        self.runs: list[Any] = []
        if not enabled:
            return
        for name in reporters(cfg):
            if name in ("wandb", "trackio"):
                mod = __import__(name)
                self.runs.append(
                    mod.init(project=cfg.train.run_name or "gkd-service", name=cfg.train.run_name, config={})
                )

    def log(self, step: int, values: dict[str, Any]) -> None:
        scalars = {k: v for k, v in values.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        for run in self.runs:
            run.log(scalars, step=step)

    def close(self) -> None:
        for run in self.runs:
            run.finish()
        self.runs = []
