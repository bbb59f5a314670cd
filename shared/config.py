"""The one typed config tree: the single source of truth for the learner and the Ray job.

Users give it as a YAML/TOML file (`--config`), as the seed's flags (TRL `examples/scripts/gkd.py`
names and meanings), or both; flags override the file. Every field's flag is `--<field name>`, so
the seed command line works unchanged. Validation happens here, before anything heavy is imported,
and reports one line per mistake.

This module imports only the standard library, msgspec and (lazily) yaml, so `--help` is instant.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tomllib
from pathlib import Path
from typing import Any, Literal, get_args, get_origin, get_type_hints

import msgspec

from shared import trl_flags


class ModelConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    model_name_or_path: str | None = None
    teacher_model_name_or_path: str | None = None
    # auto: bfloat16 on CUDA (with TF32 matmuls), float32 on CPU (learner.models.resolve_torch_dtype)
    torch_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    attn_implementation: str | None = None
    trust_remote_code: bool = False
    model_revision: str = "main"
    device: str = "auto"
    teacher_device: str | None = None
    teacher_url: str | None = None
    # ---- TRL ModelConfig's quantization (QLoRA): bitsandbytes, CUDA only
    load_in_4bit: bool = False
    load_in_8bit: bool = False
    bnb_4bit_quant_type: Literal["nf4", "fp4"] = "nf4"
    use_bnb_nested_quant: bool = False
    bnb_4bit_quant_storage: str | None = None


class LoraConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    use_peft: bool = False
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    lora_target_modules: list[str] | None = None
    use_rslora: bool = False
    lora_task_type: str = "CAUSAL_LM"


class DataConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    dataset_name: str | None = None
    dataset_config: str | None = None
    dataset_train_split: str = "train"
    dataset_test_split: str = "test"
    max_length: int = 1024
    max_prompt_length: int | None = None
    overlong_prompts: Literal["truncate", "skip"] = "skip"
    eval_samples: int = 32
    curve_samples: int = 16


class TrainConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    output_dir: str = "gkd-output"
    learning_rate: float = 2e-5
    per_device_train_batch_size: int = 8
    gradient_accumulation_steps: int = 1
    num_train_epochs: float = 3.0
    max_steps: int = -1
    lr_scheduler_type: Literal[
        "linear",
        "cosine",
        "constant",
        "constant_with_warmup",
        "cosine_with_restarts",
        "polynomial",
        "inverse_sqrt",
        "cosine_with_min_lr",
        "warmup_stable_decay",
    ] = "linear"
    warmup_ratio: float = 0.0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    gradient_checkpointing: bool = False
    disable_dropout: bool = True
    seed: int = 42
    logging_steps: int = 10
    save_steps: int = 500
    eval_strategy: Literal["no", "steps", "epoch"] = "no"
    eval_steps: int | None = None
    curve_steps: int | None = None
    save_merged: bool = False
    push_to_hub: bool = False
    hub_model_id: str | None = None
    max_time_s: float | None = None
    resume: str | None = None
    loss_chunk_size: int | None = None
    torch_num_threads: int | None = None
    # ---- run identity and resumption (TRL / HF TrainingArguments names and meanings)
    overwrite_output_dir: bool = False
    save_total_limit: int | None = None
    resume_from_checkpoint: str | None = None
    run_name: str | None = None
    # ---- TRL / HF TrainingArguments: precision, optimizer, schedule, logging (shared/trl_flags.py
    # classifies the rest of TRL's flags)
    bf16: bool | None = None
    fp16: bool = False
    tf32: bool | None = None
    use_cpu: bool = False
    optim: str = "adamw_torch_fused"
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    lr_scheduler_kwargs: dict[str, Any] | str | None = None
    warmup_steps: float = 0
    report_to: list[str] | str | None = msgspec.field(default_factory=lambda: ["tensorboard"])
    logging_dir: str | None = None
    per_device_eval_batch_size: int = 8
    eval_on_start: bool = False
    save_only_model: bool = False
    hub_token: str | None = None
    hub_private_repo: bool | None = None


class GKDConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    lmbda: float = 0.5
    lmbda_schedule: Literal["constant", "linear"] = "constant"
    beta: float = 0.5
    temperature: float = 0.9
    max_new_tokens: int = 128
    seq_kd: bool = False
    loss_temperature: float | None = 1.0
    eval_beta: float | None = None
    teacher_topk: int = 20
    loss_type: Literal["jsd", "sampled_rkl", "nll", "dft"] = "jsd"


class RolloutConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    rollout_url: str | None = None
    transport: Literal["auto", "zmq", "ray", "inproc"] = "auto"
    sync_steps: int = 1
    max_staleness: int = 0
    max_inflight: int = 2
    token: str | None = None
    server_host: str = "127.0.0.1"
    server_port: int = 5555
    request_timeout_s: float = 600.0
    reconnect_deadline_s: float = 120.0
    max_message_mb: int | None = None  # None: shared.messages.DEFAULT_MAX_MESSAGE_BYTES (512 MiB)


class Config(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    model: ModelConfig = msgspec.field(default_factory=ModelConfig)
    lora: LoraConfig = msgspec.field(default_factory=LoraConfig)
    data: DataConfig = msgspec.field(default_factory=DataConfig)
    train: TrainConfig = msgspec.field(default_factory=TrainConfig)
    gkd: GKDConfig = msgspec.field(default_factory=GKDConfig)
    rollout: RolloutConfig = msgspec.field(default_factory=RolloutConfig)


SECTIONS: dict[str, type[msgspec.Struct]] = {
    "model": ModelConfig,
    "lora": LoraConfig,
    "data": DataConfig,
    "train": TrainConfig,
    "gkd": GKDConfig,
    "rollout": RolloutConfig,
}

HELP: dict[str, str] = {
    "model_name_or_path": "Student model: hub id (org/name, or a single name like gpt2) or local directory.",
    "teacher_model_name_or_path": "Teacher model: hub id or local directory (required).",
    "torch_dtype": "Weights dtype for student and teacher; auto = bfloat16 on CUDA (TF32 matmuls on), float32 on CPU.",
    "attn_implementation": "transformers attention implementation (eager, sdpa, flash_attention_2).",
    "trust_remote_code": "Allow custom modelling code from the model repo.",
    "model_revision": "Hub revision (branch, tag or commit) of the models.",
    "device": "Student device: auto (cuda if available, else cpu), cpu, cuda, cuda:N.",
    "teacher_device": "Teacher device (default: the student's); the teacher may live on another device.",
    "teacher_url": "Teacher server(s) (gkd-rollout-server --role teacher): tcp://host:port or ray://<actor name>, comma-separated for replicas (least-loaded); the teacher is then not loaded here and the loss is the top-k + tail JSD (or sampled RKL).",
    "use_peft": "Train a LoRA adapter (TRL's meaning); off (TRL's default): full fine-tuning, pushes carry whole tensors.",
    "lora_r": "LoRA rank.",
    "lora_alpha": "LoRA alpha (scale = alpha / r).",
    "lora_dropout": "LoRA dropout.",
    "lora_target_modules": "Modules to adapt (all-linear: every linear projection); default: PEFT's per-architecture default (q_proj, v_proj for Llama/Qwen2).",
    "use_rslora": "Rank-stabilised LoRA: scale = lora_alpha / sqrt(r).",
    "lora_task_type": "PEFT task type; CAUSAL_LM (the only one a causal-LM distillation can use).",
    "load_in_4bit": "QLoRA: load the student in 4 bits (bitsandbytes, CUDA only); the server serves the unquantized base.",
    "load_in_8bit": "Load the student in 8 bits (bitsandbytes, CUDA only).",
    "bnb_4bit_quant_type": "4-bit quantization type.",
    "use_bnb_nested_quant": "Nested (double) quantization of the 4-bit constants.",
    "bnb_4bit_quant_storage": "Storage dtype of the 4-bit weights (e.g. uint8, bfloat16).",
    "dataset_name": "Hub dataset name or a local .json/.jsonl/.parquet file or directory.",
    "dataset_config": "Dataset configuration name.",
    "dataset_train_split": "Split to train on.",
    "dataset_test_split": "Split to evaluate on (a held-out slice of train if missing).",
    "max_length": "Maximum prompt+completion length in tokens.",
    "max_prompt_length": "Maximum prompt length (default: max_length - max_new_tokens).",
    "overlong_prompts": "What to do with prompts over max_prompt_length: skip or truncate (counted either way).",
    "eval_samples": "Held-out prompts used per evaluation.",
    "curve_samples": "Eval prompts (the first N) of each curve_steps point.",
    "output_dir": "Where the adapter, checkpoints, metrics and config.json go.",
    "learning_rate": "Peak AdamW learning rate.",
    "per_device_train_batch_size": "Sequences per micro-batch.",
    "gradient_accumulation_steps": "Micro-batches per optimizer step.",
    "num_train_epochs": "Epochs over the training prompts (ignored when max_steps > 0).",
    "max_steps": "Total optimizer steps; -1 derives it from num_train_epochs.",
    "lr_scheduler_type": "Learning-rate schedule.",
    "warmup_ratio": "Share of steps used for linear warmup.",
    "weight_decay": "AdamW weight decay.",
    "max_grad_norm": "Gradient clipping norm (0 disables).",
    "gradient_checkpointing": "Recompute activations in backward to save memory.",
    "disable_dropout": "Disable dropout in student and teacher.",
    "seed": "Random seed (data order, on/off-policy draws, sampling).",
    "logging_steps": "Log metrics every N optimizer steps.",
    "save_steps": "Write a resumable checkpoint every N optimizer steps.",
    "eval_strategy": "When to evaluate: no, steps (every eval_steps) or epoch.",
    "eval_steps": "Evaluate every N steps (default: logging_steps).",
    "curve_steps": "Every N steps, and at the start and end, a cheap held-out point: JSD on the teacher text of the first curve_samples eval prompts, no sampling (curve/* in metrics.jsonl).",
    "max_time_s": "Stop after the step that crosses this many seconds of training (a fixed wall-clock budget); the final evaluation and saves follow.",
    "push_to_hub": "Upload the adapter to the Hugging Face Hub at the end.",
    "hub_model_id": "Hub repo id for push_to_hub (default: output_dir name).",
    "save_merged": "Also write a merged full model to output_dir/merged.",
    "resume": "Resume from 'latest' or a checkpoint path (only a checkpoint of the same run, same config).",
    "overwrite_output_dir": "Replace the run already in output_dir (its checkpoints and metrics); without it a fresh run into a used output_dir is refused.",
    "save_total_limit": "Keep only the newest N complete checkpoints (default: all).",
    "resume_from_checkpoint": "TRL's resume flag: a checkpoint path, or true (alone: --resume_from_checkpoint) for the latest checkpoint of the run in output_dir.",
    "run_name": "A name for the run (logs, config.json, model card); default: the output_dir name.",
    "bf16": "bf16 mixed precision (autocast) for the student and teacher forwards; weights stay --torch_dtype.",
    "fp16": "fp16 mixed precision (autocast, gradient scaling); CUDA only.",
    "tf32": "Allow TF32 matmuls on Ampere+ GPUs (no effect on CPU).",
    "use_cpu": "Train on the CPU even when CUDA is available (sets --device cpu).",
    "optim": "Optimizer: adamw_torch or adamw_torch_fused (TRL's default).",
    "adam_beta1": "AdamW beta1.",
    "adam_beta2": "AdamW beta2.",
    "adam_epsilon": "AdamW epsilon.",
    "lr_scheduler_kwargs": "Extra scheduler arguments as JSON (e.g. '{\"num_cycles\": 2}').",
    "warmup_steps": "Linear warmup steps; a value in (0, 1) is a share of the total steps (overrides warmup_ratio).",
    "report_to": "Where metrics also go: tensorboard, wandb, trackio, none or all (metrics.jsonl always).",
    "logging_dir": "TensorBoard directory (default: output_dir/runs).",
    "per_device_eval_batch_size": "Sequences per evaluation forward pass.",
    "eval_on_start": "Evaluate once before the first optimizer step.",
    "save_only_model": "Checkpoints hold the weights only (no optimizer, scheduler or RNG state): they cannot be resumed.",
    "hub_token": "Hugging Face token for --push_to_hub (default: HF_TOKEN / the cached login); never written to disk.",
    "hub_private_repo": "Create the hub repo as private.",
    "loss_chunk_size": "Tokens per chunk of the chunked fused JSD; setting it forces that path (default: automatic, ~1M logits per chunk, used for large inputs).",
    "torch_num_threads": "CPU threads for the learner's torch ops (default: torch's); 1 avoids thread thrashing when a CPU rollout server shares few cores.",
    "lmbda": "Share of micro-batches trained on the student's own samples (on-policy), in [0, 1].",
    "beta": "JSD interpolation: 0 = KL(teacher||student), 1 = KL(student||teacher), in [0, 1].",
    "temperature": "Sampling temperature; also divides both logits in the loss.",
    "max_new_tokens": "Maximum tokens generated per completion.",
    "seq_kd": "Sequence-level KD: train on teacher-generated completions.",
    "lmbda_schedule": "constant: every micro-batch is on-policy with probability lmbda; linear: the probability ramps from 0 at the first step to lmbda at the last (off-policy first, then on-policy).",
    "eval_beta": "Beta of the evaluation's (and the curve's) JSD (default: the training beta); fix it to compare runs of different beta on one figure.",
    "loss_temperature": "Temperature dividing both logits in the loss (default 1.0, as TRL's GKDTrainer, whose loss ignores --temperature).",
    "teacher_topk": "Top-k entries per position a remote teacher (--teacher_url) sends; the loss then has k + 1 bins (the top-k and the rest).",
    "loss_type": "jsd: generalized JSD (full vocabulary, or top-k + tail with --teacher_url); sampled_rkl: sampled-token reverse KL (needs lmbda 1); TRL's SFT values nll and dft, which GKDTrainer's loss ignores, mean jsd.",
    "rollout_url": "Rollout server: tcp://host:port (ZeroMQ) or ray://<actor name>; a comma-separated list for several replicas (env GKD_ROLLOUT_URL; default tcp://server_host:server_port).",
    "transport": "Transport; auto picks it from the rollout_url scheme.",
    "sync_steps": "Push the adapter every N optimizer steps.",
    "max_staleness": "Never train on rollouts more than N policy versions old; 0 (TRL's strict on-policy) still overlaps sampling with training inside an optimizer step, >= 1 also across steps.",
    "max_inflight": "Rollout requests kept in flight ahead of training.",
    "token": "Shared secret for the server's control channel (env GKD_TOKEN).",
    "server_host": "Rollout server bind host.",
    "server_port": "Rollout server port.",
    "request_timeout_s": "Seconds to wait for one rollout reply.",
    "reconnect_deadline_s": "How long to retry an unreachable server before failing.",
    "max_message_mb": "Largest message the learner sends or accepts, in MiB (default 512); a 7B adapter at r64 is ~650 MB in fp32: raise it here and the server's --max_message_mb.",
}


class ConfigError(Exception):
    """Invalid configuration: carries one message per mistake."""

    def __init__(self, errors: list[str]):
        super().__init__("\n".join(errors))
        self.errors = errors


# ---------------------------------------------------------------- validation


def validate(cfg: Config) -> list[str]:
    """Return one line per mistake: the field, the value and what is allowed."""
    errs: list[str] = []

    def need(ok: bool, field: str, value: Any, allowed: str) -> None:
        if not ok:
            errs.append(f"{field}={value!r} is invalid: must be {allowed}")

    g, t, lo, d, r, m = cfg.gkd, cfg.train, cfg.lora, cfg.data, cfg.rollout, cfg.model
    need(0.0 <= g.lmbda <= 1.0, "lmbda", g.lmbda, "in [0, 1]")
    need(0.0 <= g.beta <= 1.0, "beta", g.beta, "in [0, 1]")
    need(g.temperature > 0, "temperature", g.temperature, "> 0")
    need(g.loss_temperature is None or g.loss_temperature > 0, "loss_temperature", g.loss_temperature, "> 0")
    need(g.eval_beta is None or 0.0 <= g.eval_beta <= 1.0, "eval_beta", g.eval_beta, "in [0, 1]")
    need(g.max_new_tokens > 0, "max_new_tokens", g.max_new_tokens, "a positive integer")
    # Counts that must be positive (or None where the setting is optional).
    for name in ("per_device_train_batch_size", "gradient_accumulation_steps", "logging_steps", "save_steps"):
        need(getattr(t, name) > 0, name, getattr(t, name), "a positive integer")
    optional = ("eval_steps", "curve_steps", "loss_chunk_size", "torch_num_threads", "save_total_limit")
    for section, name in [(t, n) for n in optional] + [(r, "max_message_mb")]:
        v = getattr(section, name)
        need(v is None or v > 0, name, v, "a positive integer")
    need(
        t.max_steps == -1 or t.max_steps > 0,
        "max_steps",
        t.max_steps,
        "a positive integer (or -1 to use num_train_epochs)",
    )
    need(t.num_train_epochs > 0, "num_train_epochs", t.num_train_epochs, "> 0")
    need(t.learning_rate > 0, "learning_rate", t.learning_rate, "> 0")
    need(0.0 <= t.warmup_ratio < 1.0, "warmup_ratio", t.warmup_ratio, "in [0, 1)")
    need(t.max_time_s is None or t.max_time_s > 0, "max_time_s", t.max_time_s, "> 0")
    need(lo.lora_r > 0, "lora_r", lo.lora_r, "a positive integer")
    need(lo.lora_alpha > 0, "lora_alpha", lo.lora_alpha, "a positive integer")
    need(0.0 <= lo.lora_dropout < 1.0, "lora_dropout", lo.lora_dropout, "in [0, 1)")
    need(d.max_length > 1, "max_length", d.max_length, "an integer > 1")
    need(
        d.max_prompt_length is None or 0 < d.max_prompt_length < d.max_length,
        "max_prompt_length",
        d.max_prompt_length,
        "in (0, max_length)",
    )
    need(d.eval_samples > 0, "eval_samples", d.eval_samples, "a positive integer")
    need(d.curve_samples > 0, "curve_samples", d.curve_samples, "a positive integer")
    if t.resume and _trl_resume(t) and _trl_resume(t) != t.resume:
        errs.append(
            f"resume={t.resume!r} and resume_from_checkpoint={t.resume_from_checkpoint!r} disagree: give one of them"
        )
    need(r.sync_steps > 0, "sync_steps", r.sync_steps, "a positive integer")
    need(r.max_staleness >= 0, "max_staleness", r.max_staleness, ">= 0")
    need(r.max_inflight > 0, "max_inflight", r.max_inflight, "a positive integer")
    need(0 < r.server_port < 65536, "server_port", r.server_port, "in [1, 65535]")
    need(r.request_timeout_s > 0, "request_timeout_s", r.request_timeout_s, "> 0")
    need(r.reconnect_deadline_s > 0, "reconnect_deadline_s", r.reconnect_deadline_s, "> 0")
    need(bool(m.model_name_or_path), "model_name_or_path", m.model_name_or_path, "set (the student model)")
    need(
        bool(m.teacher_model_name_or_path) or bool(m.teacher_url),
        "teacher_model_name_or_path",
        m.teacher_model_name_or_path,
        "set (the teacher model), or a teacher server given as --teacher_url",
    )
    errs += _teacher_errors(cfg)
    need(bool(d.dataset_name), "dataset_name", d.dataset_name, "set (a hub dataset or a local file)")
    urls = [u.strip() for u in (r.rollout_url or "").split(",")] if r.rollout_url is not None else []
    if any(not u.startswith(("tcp://", "ray://", "inproc://")) for u in urls):
        errs.append(
            f"rollout_url={r.rollout_url!r} is invalid: each URL (comma-separated for replicas) must start with tcp://, ray:// or inproc://"
        )
    elif len(urls) > 1 and (len(set(urls)) != len(urls) or any(u.startswith("inproc://") for u in urls)):
        errs.append(
            f"rollout_url={r.rollout_url!r} is invalid: a replica list holds distinct tcp:// or ray:// URLs"
        )
    for field in ("device", "teacher_device"):
        dev = getattr(m, field)
        if dev is not None and not _valid_device(dev):
            errs.append(f"{field}={dev!r} is invalid: must be auto, cpu, cuda or cuda:N")
    scheme = {"zmq": "tcp://", "ray": "ray://", "inproc": "inproc://"}.get(r.transport)
    if scheme and any(not u.startswith(scheme) for u in urls):
        errs.append(
            f"transport={r.transport!r} does not match rollout_url={r.rollout_url!r}: a {r.transport} URL starts with {scheme}"
        )
    errs += validate_trl(cfg)
    if g.max_new_tokens >= d.max_length:
        errs.append(
            f"max_new_tokens={g.max_new_tokens} is invalid: must be smaller than max_length={d.max_length}"
        )
    return errs


def _teacher_errors(cfg: Config) -> list[str]:
    """The remote-teacher and loss-type settings (one line each)."""
    g, m, errs = cfg.gkd, cfg.model, []
    if g.teacher_topk <= 0:
        errs.append(f"teacher_topk={g.teacher_topk} is invalid: must be a positive integer")
    loss_t = loss_temperature(cfg)
    if g.loss_type == "sampled_rkl" and g.lmbda < 1.0:
        errs.append(
            f"loss_type='sampled_rkl' needs lmbda=1 (got {g.lmbda}): the sampled reverse KL is only valid on the student's own samples"
        )
    if g.loss_type == "sampled_rkl" and g.temperature != loss_t:
        errs.append(
            f"loss_type='sampled_rkl' needs the sampling temperature ({g.temperature}) to equal the loss temperature ({loss_t}): "
            "its gradient assumes the tokens are samples of the distribution it scores"
        )
    if m.teacher_url is None:
        return errs
    urls = [u.strip() for u in m.teacher_url.split(",")]
    if not all(u.startswith(("tcp://", "ray://")) for u in urls) or len(set(urls)) != len(urls):
        errs.append(
            f"teacher_url={m.teacher_url!r} is invalid: must be distinct tcp://host:port or ray://<actor name> URLs, comma-separated"
        )
    if loss_t != 1.0:
        errs.append(
            f"loss temperature {loss_t} is invalid with teacher_url: a teacher server scores at temperature 1 "
            "(vLLM prompt logprobs) and tempering its top-k exactly would need its whole tail; pass --loss_temperature 1"
        )
    return errs


OPTIMIZERS = ("adamw_torch", "adamw_torch_fused")
REPORTERS = ("tensorboard", "wandb", "trackio", "none", "all")


def validate_trl(cfg: Config) -> list[str]:
    """The TRL-named settings (shared/trl_flags.py): one line per mistake."""
    errs: list[str] = []
    t, lo, m = cfg.train, cfg.lora, cfg.model
    if t.optim not in OPTIMIZERS:
        errs.append(
            f"--optim: not supported by gkd-service: {t.optim!r}; the learner's optimizer is one of {', '.join(OPTIMIZERS)}"
        )
    for name in ("adam_beta1", "adam_beta2"):
        v = getattr(t, name)
        if not 0.0 <= v < 1.0:
            errs.append(f"{name}={v!r} is invalid: must be in [0, 1)")
    if t.adam_epsilon <= 0:
        errs.append(f"adam_epsilon={t.adam_epsilon!r} is invalid: must be > 0")
    if t.warmup_steps < 0 or (0 < t.warmup_steps < 1 and t.warmup_ratio):
        errs.append(
            f"warmup_steps={t.warmup_steps!r} is invalid: must be >= 0 (steps, or a share in (0, 1)), and not with warmup_ratio"
        )
    elif t.warmup_steps >= 1 and t.warmup_steps != int(t.warmup_steps):
        errs.append(f"warmup_steps={t.warmup_steps!r} is invalid: a step count >= 1 is a whole number")
    if t.per_device_eval_batch_size <= 0:
        errs.append(
            f"per_device_eval_batch_size={t.per_device_eval_batch_size!r} is invalid: must be a positive integer"
        )
    if t.bf16 and t.fp16:
        errs.append("bf16 and fp16 are both set: choose one mixed precision")
    bad = [r for r in t.report_to if r not in REPORTERS]
    if bad:
        errs.append(f"report_to={bad[0]!r} is invalid: must be among {', '.join(REPORTERS)}")
    try:
        scheduler_kwargs(cfg)
    except ValueError as e:
        errs.append(str(e))
    if lo.lora_task_type != "CAUSAL_LM":
        errs.append(
            f"--lora_task_type: not supported by gkd-service: {lo.lora_task_type!r}; the student is a causal LM (CAUSAL_LM)"
        )
    if m.load_in_4bit and m.load_in_8bit:
        errs.append("load_in_4bit and load_in_8bit are both set: choose one")
    if (m.load_in_4bit or m.load_in_8bit) and not lo.use_peft:
        errs.append(
            f"--load_in_{'4' if m.load_in_4bit else '8'}bit needs --use_peft: quantized weights cannot be fine-tuned in full (QLoRA trains a LoRA)"
        )
    return errs


def scheduler_kwargs(cfg: Config) -> dict[str, Any]:
    """--lr_scheduler_kwargs as a dict (JSON text on the command line, a mapping in a file)."""
    v = cfg.train.lr_scheduler_kwargs
    if v is None or v == "":
        return {}
    if isinstance(v, dict):
        return v
    try:
        d = json.loads(v)
    except json.JSONDecodeError as e:
        raise ValueError(f"lr_scheduler_kwargs={v!r} is invalid: not JSON ({e.msg})") from None
    if not isinstance(d, dict):
        raise ValueError(f"lr_scheduler_kwargs={v!r} is invalid: must be a JSON object")
    return d


def loss_temperature(cfg: Config) -> float:
    """The temperature dividing both logits in the loss: 1.0 (TRL's) unless --loss_temperature."""
    return cfg.gkd.loss_temperature or 1.0


def warmup_steps(cfg: Config, total: int) -> int:
    """Warmup steps: --warmup_steps (a count, or a share of `total` below 1), else --warmup_ratio."""
    import math

    w = cfg.train.warmup_steps
    if w >= 1:
        return int(w)
    return math.ceil((w or cfg.train.warmup_ratio) * total)


def resume_target(cfg: Config) -> str | None:
    """What to resume from: None (a fresh run), "latest" or a checkpoint path.

    `--resume latest|PATH` is ours; TRL's `--resume_from_checkpoint` takes a path or true (latest).
    """
    return cfg.train.resume or _trl_resume(cfg.train)


def _trl_resume(t: TrainConfig) -> str | None:
    rfc = t.resume_from_checkpoint
    if rfc is None or rfc.strip().lower() in ("", "0", "false", "no", "none"):
        return None
    return "latest" if rfc.strip().lower() in ("1", "true", "yes", "latest") else rfc


def _valid_device(dev: str) -> bool:
    if dev in ("auto", "cpu", "cuda", "mps"):
        return True
    head, _, idx = dev.partition(":")
    return head in ("cuda", "xpu") and idx.isdigit()


def rollout_url(cfg: Config) -> str:
    """The server URL the learner talks to: rollout_url, else tcp://server_host:server_port."""
    return cfg.rollout.rollout_url or f"tcp://{cfg.rollout.server_host}:{cfg.rollout.server_port}"


def check_paths(cfg: Config) -> list[str]:
    """Local paths that are clearly meant to be local but do not exist (hub ids pass)."""
    errs = []
    for field in ("model_name_or_path", "teacher_model_name_or_path"):
        if field == "teacher_model_name_or_path" and cfg.model.teacher_url:
            continue  # served by the teacher server, never loaded here
        p = getattr(cfg.model, field)
        if p and _looks_local(p) and not Path(p).exists():
            errs.append(f"{field}={p!r} does not exist: give an existing model directory or a hub id")
    p = cfg.data.dataset_name
    if p and _looks_local(p) and not Path(p).exists():
        errs.append(
            f"dataset_name={p!r} does not exist: give an existing file/directory or a hub dataset name"
        )
    return errs


def _looks_local(p: str) -> bool:
    # A hub id is "name" (gpt2) or "org/name"; more segments, or a path-like start or suffix, is local.
    return p.startswith((".", "/", "~")) or p.endswith((".json", ".jsonl", ".parquet")) or p.count("/") > 1


# ---------------------------------------------------------------- files and flags


def load_file(path: str) -> dict[str, Any]:
    """Read a YAML or TOML config file; sections may be nested or flat (seed-style keys)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError([f"config={path!r}: file not found or not readable"])
    try:
        text = p.read_text()
    except OSError as e:
        raise ConfigError([f"config={path!r}: cannot read ({e.strerror})"]) from None
    try:
        if p.suffix == ".toml":
            data = tomllib.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text) or {}
    except Exception as e:  # noqa: BLE001 - parser errors vary by library; report them as one line
        raise ConfigError(
            [
                f"config={path!r}: not valid {'TOML' if p.suffix == '.toml' else 'YAML'}: {str(e).splitlines()[0]}"
            ]
        ) from None
    if not isinstance(data, dict):
        raise ConfigError([f"config={path!r}: top level must be a mapping"])
    return nest(data)


def field_index() -> dict[str, tuple[str, Any]]:
    """Map every flat field name to (section, type)."""
    out = {}
    for sec, cls in SECTIONS.items():
        for name, typ in get_type_hints(cls).items():
            out[name] = (sec, typ)
    return out


def nest(flat_or_nested: dict[str, Any]) -> dict[str, Any]:
    """Accept `{lmbda: 0.5}` or `{gkd: {lmbda: 0.5}}`; return the nested form."""
    idx = field_index()
    out: dict[str, dict[str, Any]] = {}
    errs = []
    for key, val in flat_or_nested.items():
        if key in SECTIONS and isinstance(val, dict):
            out.setdefault(key, {}).update(
                {k: _as_list_if_list_field(idx[k][1], v) if k in idx else v for k, v in val.items()}
            )
        elif key in idx:
            out.setdefault(idx[key][0], {})[key] = _as_list_if_list_field(idx[key][1], val)
        else:
            errs.append(f"{key}: unknown setting (see --help for the list)")
    if errs:
        raise ConfigError(errs)
    return out


def _as_list_if_list_field(typ: Any, val: Any) -> Any:
    """A bare string for a list setting is its one item (`lora_target_modules: all-linear`), as the
    flag `--lora_target_modules all-linear` is; TRL's YAML configs write it that way."""
    is_list = any(get_origin(t) is list for t in (typ, *get_args(typ)))
    return [val] if is_list and isinstance(val, str) else val


def to_config(nested: dict[str, Any]) -> Config:
    try:
        return msgspec.convert(nested, Config, strict=False)
    except msgspec.ValidationError as e:
        # msgspec says e.g. "Expected `float`, got `str` - at `$.gkd.lmbda`"
        raise ConfigError([f"invalid config: {e}"]) from None


def _bool(s: str) -> bool:
    v = s.strip().lower()
    if v in ("1", "true", "yes", "y", "on"):
        return True
    if v in ("0", "false", "no", "n", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {s!r}")


class Parser(argparse.ArgumentParser):
    """argparse that reports a bad flag as one line and exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        sys.stderr.write(f"{self.prog}: error: {message} (see --help)\n")
        raise SystemExit(2)


def build_parser(
    prog: str, description: str, extra: list[tuple[str, dict]] | None = None
) -> argparse.ArgumentParser:
    """One flag per config field, named exactly like the field (the seed's names)."""
    p = Parser(prog=prog, description=description, argument_default=argparse.SUPPRESS)
    p.add_argument("--config", help="YAML or TOML config file; flags override it.")
    for sec, cls in SECTIONS.items():
        grp = p.add_argument_group(sec)
        defaults = cls()
        for name, typ in get_type_hints(cls).items():
            kw = argkw(typ)
            if name in _BARE_VALUE:  # TRL: `--resume_from_checkpoint` alone means the latest one
                kw.update(nargs="?", const=_BARE_VALUE[name])
            # The seed's spelling (underscores) first; the dashed spelling is accepted too.
            flags = [f"--{name}"] + ([f"--{name.replace('_', '-')}"] if "_" in name else [])
            grp.add_argument(
                *flags, dest=name, help=f"{HELP.get(name, '')} (default: {getattr(defaults, name)!r})", **kw
            )
    for flag, kw in extra or []:
        p.add_argument(flag, **kw)
    trl_flags.add_flags(p, set(field_index()))  # TRL aliases, then the no-effect and refused flags, last
    return p


_BARE_VALUE = {"resume_from_checkpoint": "true"}


def argkw(typ: Any) -> dict[str, Any]:
    """argparse keywords for a field of type `typ` (Literal -> choices, bool -> optional value, list -> nargs)."""
    args = [a for a in get_args(typ) if a is not type(None)]
    base = args[0] if get_origin(typ) is not None and args and get_origin(typ) is not Literal else typ
    if get_origin(typ) is Literal:
        return {"choices": list(get_args(typ)), "type": str}
    if get_origin(base) is Literal:
        return {"choices": list(get_args(base)), "type": str}
    if base is bool:
        return {"nargs": "?", "const": True, "type": _bool, "metavar": "BOOL"}
    if get_origin(base) is list:
        return {"nargs": "+", "type": str}
    if base in (int, float, str):
        return {"type": base}
    return {"type": str}


def parse_args(
    argv: list[str] | None, prog: str = "gkd-learner", description: str = "", extra=None
) -> tuple[Config, argparse.Namespace]:
    """Parse flags (+ optional --config file) into a validated Config.

    Returns the config and the namespace of `extra` flags. Raises ConfigError on any mistake.
    """
    parser = build_parser(prog, description, extra)
    ns = parser.parse_args(argv)
    given = vars(ns).copy()
    aliased, noop, refused = trl_flags.split(given)
    nested = {}
    if "config" in given:
        nested, f_noop, f_refused = _load_file_trl(given.pop("config"))
        noop, refused = f_noop + noop, f_refused + refused
    if refused:
        raise ConfigError(refused)
    idx = field_index()
    for key, val in aliased.items():
        if key not in given:  # our own name wins when both are given
            given[key] = val
    for key in list(given):
        if key in idx:
            nested.setdefault(idx[key][0], {})[key] = given.pop(key)
    cfg = to_config(nested)
    if cfg.rollout.token is None and os.environ.get("GKD_TOKEN"):
        cfg.rollout.token = os.environ["GKD_TOKEN"]
    if cfg.rollout.rollout_url is None and os.environ.get("GKD_ROLLOUT_URL"):
        cfg.rollout.rollout_url = os.environ["GKD_ROLLOUT_URL"]  # lets the seed's command line run unchanged
    if not isinstance(cfg.train.report_to, list):  # TRL takes one name or a list
        cfg.train.report_to = [cfg.train.report_to or "none"]
    if cfg.train.use_cpu:
        cfg.model.device = "cpu"
        cfg.model.teacher_device = cfg.model.teacher_device and "cpu"
    errs = validate(cfg) + check_paths(cfg)
    if errs:
        raise ConfigError(errs)
    return cfg, argparse.Namespace(**given, trl_no_effect=noop)


def _load_file_trl(path: str) -> tuple[dict[str, Any], list[str], list[str]]:
    """load_file, with TRL's no-effect and refused keys (flat) taken out first."""
    p = Path(path)
    raw = _read_mapping(p) if p.is_file() else None
    if raw is None:
        return load_file(path), [], []
    aliased, noop, refused = trl_flags.split_file(raw, set(field_index()))
    raw.update({k: v for k, v in aliased.items() if k not in raw})
    return nest(raw), noop, refused


def _read_mapping(p: Path) -> dict[str, Any] | None:
    try:
        text = p.read_text()
        data = tomllib.loads(text) if p.suffix == ".toml" else __import__("yaml").safe_load(text)
    except Exception:  # noqa: BLE001 - load_file reports it as one line
        return None
    return data if isinstance(data, dict) else None


def to_dict(cfg: Config) -> dict[str, Any]:
    d = msgspec.to_builtins(cfg)
    d["rollout"]["token"] = "***" if d["rollout"]["token"] else None  # never write secrets to disk
    d["train"]["hub_token"] = "***" if d["train"]["hub_token"] else None
    return d


def write_resolved(cfg: Config, output_dir: str | os.PathLike, run: dict[str, Any] | None = None) -> Path:
    """Write the resolved config as output_dir/config.json (secrets redacted), with the run's
    identity (id, config hash) under the key "run" when given."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "config.json"
    tmp = path.with_suffix(".json.tmp")
    d = to_dict(cfg)
    if run is not None:
        d["run"] = run
    tmp.write_text(json.dumps(d, indent=2, sort_keys=True) + "\n")
    tmp.replace(path)
    return path


def from_json(path: str | os.PathLike) -> Config:
    """Load a config.json written by write_resolved (a redacted token comes back as None)."""
    d = json.loads(Path(path).read_text())
    d.pop("run", None)  # the run's identity, not a setting
    if d.get("rollout", {}).get("token") == "***":
        d["rollout"]["token"] = None
    if d.get("train", {}).get("hub_token") == "***":
        d["train"]["hub_token"] = None
    return to_config(d)


def exit_on_config_error(prog: str, err: ConfigError) -> None:
    for line in err.errors:
        sys.stderr.write(f"{prog}: error: {line}\n")
    raise SystemExit(2)
