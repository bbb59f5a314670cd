"""One optimizer step over gradient_accumulation_steps micro-batches, normalized as TRL does.

Since TRL #4719, the loss of an optimizer step is the sum of the per-token divergences of all its
micro-batches (on all ranks) divided by their total completion tokens; a micro-batch with few
tokens weighs less than one with many (not: the mean of per-micro-batch means). Each micro-batch
here backpropagates its sum as it comes, so sampling the next one still overlaps training this
one, and the gradients are divided by the total once it is known, before clipping.

Used by learner.recipe (micro-batches from the rollout server) and by the TRL agreement tests
(micro-batches of dataset completions, lmbda 0): the same code either way.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from learner import dist, trl_runtime
from learner.step import TeacherTargets, collate, completion_logits, targets_loss
from learner.teacher import LocalTeacher
from shared.config import Config, loss_temperature


def accumulate(
    cfg: Config, m, params, micro_batches: Iterable[tuple[list[list[int]], list[list[int]]]], info
) -> tuple[float, int]:
    """Backpropagate every (prompts, completions) micro-batch; return (step loss, completion tokens).

    `m` is a learner.models.Models; `info` a learner.dist.DistInfo. Leaves the step's gradients
    (token-normalized, not yet averaged over ranks) in `params`.
    """
    teacher = LocalTeacher(m.teacher, m.teacher_device, vocab=m.vocab_size)
    total, tokens = 0.0, 0
    for prompts, completions in micro_batches:
        batch = collate(prompts, completions, m.tokenizer.pad_token_id, cfg.data.max_length)
        if batch is None:
            continue
        batch = batch.to(m.device)
        with trl_runtime.autocast(cfg, m.device):
            s_logits = completion_logits(m.student, batch, m.vocab_size)
            loss_sum = micro_batch_loss_sum(cfg, s_logits, teacher.collect(None, batch), batch.labels)
        loss_sum.backward()
        total += loss_sum.item()
        tokens += batch.n_tokens
    return scale_to_step_tokens(params, total, tokens, info), tokens


def micro_batch_loss_sum(
    cfg: Config, s_logits: torch.Tensor, targets: TeacherTargets, labels
) -> torch.Tensor:
    """The configured loss of one micro-batch, summed over its completion tokens (the step divides
    by all of them: `scale_to_step_tokens`)."""
    return targets_loss(
        s_logits,
        targets,
        labels,
        loss_type=cfg.gkd.loss_type,
        beta=cfg.gkd.beta,
        temperature=loss_temperature(cfg),
        chunk_size=cfg.train.loss_chunk_size,
        reduction="sum",
    )


def update(cfg: Config, params, optimizer, scheduler, info) -> float:
    """Average the gradients over the ranks, clip, step optimizer and schedule; return the grad norm."""
    dist.average_gradients(params, info)
    clip = cfg.train.max_grad_norm if cfg.train.max_grad_norm > 0 else float("inf")
    grad_norm = torch.nn.utils.clip_grad_norm_(params, clip)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return float(grad_norm)


def scale_to_step_tokens(params, loss_sum: float, tokens: int, info) -> float:
    """Turn summed gradients into those of (sum of per-token losses) / (completion tokens of the
    whole step, all ranks); return that step loss. Gradients are then averaged over the ranks, so
    each rank scales by world_size / total tokens."""
    total_sum, total_tokens = loss_sum, float(tokens)
    if info.world_size > 1:
        mean_sum, mean_tokens = dist.all_mean([loss_sum, float(tokens)], info)
        total_sum, total_tokens = mean_sum * info.world_size, mean_tokens * info.world_size
    if total_tokens <= 0:
        return float("nan")
    factor = info.world_size / total_tokens
    for p in params:
        if p.grad is not None:
            p.grad.mul_(factor)
    return total_sum / total_tokens
