"""TRL's flag surface: every field of TRL's `ScriptArguments`, `GKDConfig` (with its
`TrainingArguments` base) and `ModelConfig`, classified.

A TRL command line runs here unchanged. Each TRL flag is one of:

* implemented with TRL's meaning: a field of the config tree (shared/config.py) under the same
  name, or a TRL name that sets one of ours (`ALIASES`, e.g. `--dtype` sets `torch_dtype`);
* accepted and reported as having no effect here (`NO_EFFECT`, with the reason): one warning line
  at start lists those given;
* refused (`REFUSED`, with the reason): giving one with a value other than TRL's default is
  `--FLAG: not supported by gkd-service: REASON` and exit 2. (`--torch_compile false` passes.)

tests/test_trl_flags.py enumerates the dataclasses of the installed trl and checks each field is
classified here or in the config tree, so a flag a new TRL release adds fails that test.

Standard library only (it is imported by shared/config.py, which `--help` loads).
"""

from __future__ import annotations

import argparse
from typing import Any

# TRL name -> our config field it sets (same meaning, our name).
ALIASES: dict[str, str] = {
    "dtype": "torch_dtype",  # ModelConfig.dtype (transformers' new name for torch_dtype)
}

# TRL name -> why it has no effect here. Accepted with any value.
NO_EFFECT: dict[str, str] = {
    # ScriptArguments
    "dataset_streaming": "the prompts are tokenized once at start; the dataset is read in full",
    "ignore_bias_buffers": "for DDP with boolean buffers; the learner's ranks all-reduce gradients themselves",
    # TrainingArguments: data loading
    "dataloader_drop_last": "there is no DataLoader: prompts are drawn in seeded epochs and every optimizer step is full",
    "dataloader_num_workers": "there is no DataLoader: rollouts come from the rollout server",
    "dataloader_pin_memory": "there is no DataLoader: rollouts come from the rollout server",
    "dataloader_persistent_workers": "there is no DataLoader: rollouts come from the rollout server",
    "dataloader_prefetch_factor": "there is no DataLoader: prefetching is --max_inflight rollout requests",
    "dataloader_multiprocessing_context": "there is no DataLoader: rollouts come from the rollout server",
    "dataloader_in_order": "there is no DataLoader: prompts are drawn in seeded epochs",
    "remove_unused_columns": "the dataset's columns are read by shape (messages, prompt/completion, prompt)",
    "label_names": "labels are the completion tokens, always",
    "train_sampling_strategy": "prompts are drawn as a seeded permutation per epoch",
    "length_column_name": "prompts are not grouped by length",
    "data_seed": "the prompt order is seeded by --seed",
    "ignore_data_skip": "a resumed run continues from the checkpoint's exact data position at no cost",
    # logging
    "logging_strategy": "training rows go to metrics.jsonl every --logging_steps optimizer steps",
    "logging_first_step": "the first row is at step --logging_steps (the start event is logged at step 0)",
    "log_on_each_node": "only rank 0 logs",
    "logging_nan_inf_filter": "a non-finite loss is logged as it is",
    "include_num_input_tokens_seen": "metrics.jsonl logs the completion tokens per second of each window",
    "log_level": "the learner logs at INFO",
    "log_level_replica": "only rank 0 logs",
    "disable_tqdm": "the progress bar goes to stderr; metrics.jsonl is the record",
    "skip_memory_metrics": "memory metrics are not collected",
    "debug": "no debug modes",
    # evaluation
    "prediction_loss_only": "evaluation reports the JSD figures, not predictions",
    "eval_do_concat_batches": "evaluation reports the JSD figures, not predictions",
    "eval_use_gather_object": "evaluation runs on rank 0 only",
    "eval_accumulation_steps": "evaluation reports the JSD figures, not predictions",
    "include_for_metrics": "there is no compute_metrics",
    "batch_eval_metrics": "there is no compute_metrics",
    "eval_delay": "evaluation follows --eval_strategy / --eval_steps",
    # the task, the run
    "do_train": "gkd-learner always trains",
    "do_eval": "evaluation follows --eval_strategy",
    "do_predict": "there is no prediction step",
    "local_rank": "the rank comes from torchrun's environment (LOCAL_RANK)",
    "ddp_timeout": "ranks use torch.distributed's default timeout",
    "ddp_backend": "the backend is nccl on CUDA, gloo on CPU",
    "ddp_find_unused_parameters": "there is no DDP wrapper: gradients are all-reduced explicitly",
    "ddp_bucket_cap_mb": "there is no DDP wrapper: gradients are all-reduced explicitly",
    "ddp_broadcast_buffers": "there is no DDP wrapper: parameters are broadcast once at start",
    "ddp_static_graph": "there is no DDP wrapper",
    "save_on_each_node": "rank 0 writes every checkpoint",
    "restore_callback_states_from_checkpoint": "there are no callbacks",
    "hub_strategy": "the output is uploaded once, at the end",
    "hub_always_push": "the output is uploaded once, at the end",
    "torch_empty_cache_steps": "the learner does not empty the CUDA cache",
    "average_tokens_across_devices": "always: the loss of an optimizer step is divided by the completion tokens of all its micro-batches on all ranks",
    "use_liger_kernel": "the distillation loss is gkd-service's own chunked fused JSD; Liger kernels are not used",
    "liger_kernel_config": "Liger kernels are not used (see --use_liger_kernel)",
    "use_cache": "the KV cache is off in training forwards and on in generation, always",
    "project": "the wandb / trackio project is taken from their own environment variables",
    "trackio_space_id": "trackio logs locally; set its environment to use a Space",
    "trackio_bucket_id": "trackio logs locally; set its environment to use a bucket",
    "trackio_static_space_id": "trackio logs locally; set its environment to use a Space",
    # SFTConfig (GKDConfig's base): dataset preparation the learner does its own way
    "model_init_kwargs": "the student is loaded from --torch_dtype, --attn_implementation, --model_revision, --trust_remote_code",
    "teacher_model_init_kwargs": "the teacher is loaded with the student's settings",
    "dataset_text_field": "the dataset's shape decides (messages, prompt/completion, prompt)",
    "dataset_kwargs": "the dataset is used as it is (GKDTrainer also skips SFT's preparation)",
    "dataset_num_proc": "prompts are tokenized in one process",
    "shuffle_dataset": "prompts are drawn as a seeded permutation per epoch anyway",
    "completion_only_loss": "GKD trains on completion tokens only, always",
    "assistant_only_loss": "GKD trains on completion tokens only, always",
    "pad_to_multiple_of": "micro-batches are padded to their longest sequence",
    "truncation_mode": "overlong prompts follow --overlong_prompts (skip or keep their end)",
    "eval_packing": "sequences are never packed",
    "router_aux_loss_coef": "the loss is the generalized JSD only",
    "label_smoothing_factor": "the loss is the generalized JSD against the teacher, not cross-entropy",
}

# TRL name -> why it is refused (when given a value other than TRL's default).
REFUSED: dict[str, str] = {
    "deepspeed": "use torchrun ranks (gradients all-reduced), LoRA or gradient checkpointing for memory",
    "fsdp": "the learner shards nothing; use torchrun ranks (data parallel) or LoRA for memory",
    "fsdp_config": "the learner shards nothing (see --fsdp)",
    "accelerator_config": "the learner does not use accelerate",
    "parallelism_config": "the learner does not use accelerate",
    "torch_compile": "the student is trained eagerly (the weights change in place on every push)",
    "torch_compile_backend": "the student is trained eagerly (see --torch_compile)",
    "torch_compile_mode": "the student is trained eagerly (see --torch_compile)",
    "neftune_noise_alpha": "noisy embeddings would make the student's logits differ from the policy the server samples",
    "auto_find_batch_size": "the batch size is fixed (the rollout requests are sized by it)",
    "load_best_model_at_end": "the output is the last step's model; evaluation figures are in metrics.jsonl",
    "metric_for_best_model": "the output is the last step's model (see --load_best_model_at_end)",
    "greater_is_better": "the output is the last step's model (see --load_best_model_at_end)",
    "full_determinism": "set --seed; CUDA's deterministic algorithms are not forced",
    "bf16_full_eval": "evaluation runs in --torch_dtype",
    "fp16_full_eval": "evaluation runs in --torch_dtype",
    "optim_args": "the optimizer takes --adam_beta1, --adam_beta2, --adam_epsilon, --weight_decay",
    "optim_target_modules": "only the adamw optimizers are supported (see --optim)",
    "gradient_checkpointing_kwargs": "checkpointing is non-reentrant, always",
    "activation_offloading": "activations stay on the device; use --gradient_checkpointing",
    "enable_jit_checkpoint": "checkpoints are written at step boundaries (and on SIGTERM / SIGINT)",
    "save_strategy": "checkpoints are written every --save_steps optimizer steps (and at the end)",
    "hub_revision": "the output is uploaded to the repo's main branch",
    "chat_template_path": "the student's tokenizer's chat template is used",
    "eos_token": "the end of a completion is the tokenizer's / generation config's eos",
    "pad_token": "the pad token is the tokenizer's (its eos when it has none)",
    "packing": "GKD trains on whole prompt + completion sequences; they are never packed",
    "packing_strategy": "sequences are never packed (see --packing)",
    "padding_free": "micro-batches are padded (left prompt, right completion)",
    "lora_target_parameters": "LoRA targets modules (--lora_target_modules); the server merges module adapters only",
    "lora_modules_to_save": "the rollout server merges LoRA pairs only; use --use_peft false for full fine-tuning",
    "use_dora": "the rollout server merges plain LoRA pairs; DoRA's magnitude vectors are not synced",
}

# TRL's default of a refused flag, where it is not off/None/empty: giving it is harmless.
REFUSED_DEFAULTS: dict[str, str] = {"save_strategy": "steps", "packing_strategy": "bfd"}

# Values that count as "not given" for a refused flag (TRL's default), beside REFUSED_DEFAULTS.
_OFF = {"", "none", "null", "false", "0", "no", "off", "[]", "{}"}


def names() -> set[str]:
    """Every TRL name this table classifies (the config tree holds the implemented rest)."""
    return set(ALIASES) | set(NO_EFFECT) | set(REFUSED)


def add_flags(parser: argparse.ArgumentParser, taken: set[str]) -> None:
    """Add the aliases, then the no-effect and refused flags (their own --help groups, at the end).

    `taken`: names the config tree already defines (those stay implemented, never shadowed).
    """
    for name, target in ALIASES.items():
        if name not in taken:
            parser.add_argument(
                f"--{name}",
                dest=f"trl_alias:{name}",
                help=f"TRL's name for --{target}.",
                default=argparse.SUPPRESS,
            )
    for title, table in (
        ("TRL flags accepted with no effect here", NO_EFFECT),
        ("TRL flags refused here", REFUSED),
    ):
        grp = parser.add_argument_group(title)
        for name, why in sorted(table.items()):
            if name in taken:
                continue
            grp.add_argument(
                f"--{name}",
                dest=f"trl_{'noop' if table is NO_EFFECT else 'refused'}:{name}",
                nargs="*",  # bare (`--packing`), one value or several (`--report_to a b`)
                metavar="VALUE",
                help=why,
                default=argparse.SUPPRESS,
            )


def given_value(v: Any) -> str:
    if isinstance(v, list):
        return "true" if not v else " ".join(str(x) for x in v)
    return str(v)


def split(given: dict[str, Any]) -> tuple[dict[str, Any], list[str], list[str]]:
    """Take the TRL-table entries out of the parsed flags.

    Returns (aliases resolved to our field names, no-effect warnings, refusal lines).
    """
    aliased: dict[str, Any] = {}
    noop: list[str] = []
    refused: list[str] = []
    for key in list(given):
        kind, _, name = key.partition(":")
        if kind == "trl_alias":
            aliased[ALIASES[name]] = given.pop(key)
        elif kind == "trl_noop":
            given.pop(key)
            noop.append(f"--{name} ({NO_EFFECT[name]})")
        elif kind == "trl_refused":
            value = given_value(given.pop(key))
            if value.strip().lower() not in _OFF | {REFUSED_DEFAULTS.get(name, "")}:
                refused.append(f"--{name}: not supported by gkd-service: {REFUSED[name]}")
    return aliased, noop, refused


def split_file(data: dict[str, Any], taken: set[str]) -> tuple[dict[str, Any], list[str], list[str]]:
    """The same for a config file's flat keys: (aliases as our names, no-effect, refusals)."""
    as_flags: dict[str, Any] = {}
    for key in list(data):
        if key in taken:
            continue
        if key in ALIASES:
            as_flags[f"trl_alias:{key}"] = data.pop(key)
        elif key in NO_EFFECT:
            as_flags[f"trl_noop:{key}"] = data.pop(key)
        elif key in REFUSED:
            v = data.pop(key)
            as_flags[f"trl_refused:{key}"] = "true" if v is True else ("" if v is None or v is False else v)
    return split(as_flags)


def warning_line(noop: list[str]) -> str:
    """The one start-up warning for the no-effect flags given."""
    return "these TRL flags have no effect here: " + "; ".join(noop)
