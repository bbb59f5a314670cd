"""Our loss equals TRL's GKDTrainer's, step by step (lmbda 0: dataset completions, no rollouts).

Both sides start from the same student (one LoRA init, copied), the same teacher, the same rows in
the same order (TRL's sampler set to sequential), the same optimizer (adamw_torch_fused), schedule
and clipping, fp32 on CPU. Our side runs the learner's own step code (learner.accumulate, with the
models, optimizer and schedule the recipe builds); TRL's side is the installed GKDTrainer, whose
per-step loss is the sum of its training_step returns over the accumulated micro-batches.
"""

from __future__ import annotations

import copy
import warnings

import pytest

pytestmark = pytest.mark.slow

STEPS, BATCH = 3, 2


def _ours(cfg, m, examples, accum):
    from learner import accumulate as acc
    from learner import trl_runtime
    from learner.dist import DistInfo

    params = [p for p in m.student.parameters() if p.requires_grad]
    opt = trl_runtime.optimizer(cfg, params, m.device)
    sched = trl_runtime.scheduler(cfg, opt, STEPS)
    losses, tokens = [], []
    for step in range(STEPS):
        mbs = []
        for k in range(accum):
            rows = examples[(step * accum + k) * BATCH : (step * accum + k + 1) * BATCH]
            mbs.append(([e.prompt_ids for e in rows], [e.completion_ids for e in rows]))
            tokens.append(sum(len(e.completion_ids) for e in rows))
        loss, _ = acc.accumulate(cfg, m, params, mbs, DistInfo())
        acc.update(cfg, params, opt, sched, DistInfo())
        losses.append(loss)
    return losses, tokens


def _trl(student, teacher, tokenizer, examples, accum, out):
    from datasets import Dataset

    try:
        from trl import GKDConfig, GKDTrainer
    except ImportError:  # trl >= 0.2x keeps GKD under experimental
        from trl.experimental.gkd import GKDConfig, GKDTrainer

    rows = [
        {
            "input_ids": e.prompt_ids + e.completion_ids,
            "completion_mask": [0] * len(e.prompt_ids) + [1] * len(e.completion_ids),
            "prompt": e.prompt_text,
        }
        for e in examples
    ]
    recorded: list[float] = []

    class Recording(GKDTrainer):
        def training_step(self, model, inputs, num_items_in_batch=None):
            loss = super().training_step(model, inputs, num_items_in_batch)
            recorded.append(loss.item())
            return loss

    args = GKDConfig(
        output_dir=str(out),
        lmbda=0.0,
        beta=0.5,
        per_device_train_batch_size=BATCH,
        gradient_accumulation_steps=accum,
        learning_rate=1e-2,
        max_steps=STEPS,
        lr_scheduler_type="linear",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=1.0,
        seed=42,
        bf16=False,
        fp16=False,
        gradient_checkpointing=False,
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        train_sampling_strategy="sequential",
        max_length=128,
        max_new_tokens=16,
        disable_dropout=True,
        use_cpu=True,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = Recording(
            model=student,
            teacher_model=teacher,
            args=args,
            train_dataset=Dataset.from_list(rows),
            processing_class=tokenizer,
        )
        trainer.train()
    assert len(recorded) == STEPS * accum
    return [sum(recorded[i * accum : (i + 1) * accum]) for i in range(STEPS)], recorded


@pytest.mark.parametrize("accum", [1, 2])
def test_loss_equals_trl_gkdtrainer(tiny_models, tiny_dataset, tmp_path, accum):
    import torch

    from learner.data import load_data
    from learner.models import load_models
    from shared.config import parse_args

    cfg, _ = parse_args(
        [
            *("--model_name_or_path", str(tiny_models.student)),
            *("--teacher_model_name_or_path", str(tiny_models.teacher)),
            *("--dataset_name", str(tiny_dataset), "--output_dir", str(tmp_path / "ours")),
            *("--lmbda", "0", "--use_peft", "--lora_r", "8", "--lora_alpha", "16", "--lora_dropout", "0"),
            *("--per_device_train_batch_size", str(BATCH), "--gradient_accumulation_steps", str(accum)),
            *(
                "--learning_rate",
                "1e-2",
                "--max_steps",
                str(STEPS),
                "--max_length",
                "128",
                "--max_new_tokens",
                "16",
            ),
        ]
    )
    torch.manual_seed(0)
    m = load_models(cfg)
    examples = load_data(cfg, m.tokenizer, need_eval=False).train
    if accum > 1:  # uneven completion lengths: every other micro-batch keeps 3 completion tokens
        for i, e in enumerate(examples):
            if (i // BATCH) % 2:
                e.completion_ids = e.completion_ids[:3]
    trl_student, trl_teacher = copy.deepcopy(m.student), copy.deepcopy(m.teacher)  # the same LoRA init

    ours, tokens = _ours(cfg, m, examples, accum)
    theirs, per_micro = _trl(trl_student, trl_teacher, m.tokenizer, examples, accum, tmp_path / "trl")
    for step, (a, b) in enumerate(zip(ours, theirs), 1):
        assert abs(a - b) <= 1e-4, (step, ours, theirs)
    assert len(set(ours)) == STEPS  # the steps really trained (a frozen student repeats nothing useful)
    if accum > 1:
        # Uneven micro-batches, and the test tells the normalizations apart: the mean of the
        # per-micro-batch means (what we did before TRL #4719's rule) is off by far more than 1e-4.
        assert len(set(tokens)) > 1, tokens
        step_tokens = [sum(tokens[i * accum : (i + 1) * accum]) for i in range(STEPS)]
        mean_of_means = [
            sum(per_micro[i * accum + k] * step_tokens[i] / tokens[i * accum + k] for k in range(accum))
            / accum
            for i in range(STEPS)
        ]
        assert max(abs(a - b) for a, b in zip(mean_of_means, theirs)) > 1e-3, (mean_of_means, theirs)
