"""One micro-batch: build the tensors, run student and teacher, take the loss on completion tokens.

Layout: prompts are LEFT-padded and completions RIGHT-padded, so every completion starts at the same
column P. Only the logits that predict completion tokens (columns P-1 .. P+C-2) are computed
(`logits_to_keep`): no [B, T, V] logits over the prompt, no gather copy. Position ids are derived
from the attention mask so left padding does not shift positions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from learner.loss import generalized_jsd_loss, sampled_rkl_loss, topk_tail_jsd_loss

IGNORE = -100


@dataclass
class Batch:
    input_ids: torch.Tensor  # [B, P + C]: left-padded prompt, then right-padded completion
    attention_mask: torch.Tensor  # [B, P + C]: 1 on real tokens
    position_ids: torch.Tensor  # [B, P + C]: 0-based positions of real tokens
    labels: torch.Tensor  # [B, C]: completion ids, IGNORE on padding
    n_tokens: int  # completion tokens counted in the loss

    def to(self, device) -> Batch:
        return Batch(
            self.input_ids.to(device),
            self.attention_mask.to(device),
            self.position_ids.to(device),
            self.labels.to(device),
            self.n_tokens,
        )


def fit_completions(
    prompts: list[list[int]], completions: list[list[int]], max_length: int
) -> list[list[int]]:
    """The completions as `collate` keeps them: cut so prompt + completion fits max_length."""
    return [c[: max(0, max_length - len(p))] for p, c in zip(prompts, completions)]


def collate(
    prompts: list[list[int]], completions: list[list[int]], pad_id: int, max_length: int
) -> Batch | None:
    """Tensors for one micro-batch; None when no completion has a token to learn from."""
    comps = fit_completions(prompts, completions, max_length)
    P, C = max(len(p) for p in prompts), max(len(c) for c in comps)
    if C == 0:
        return None
    ids, mask, labels = [], [], []
    for p, c in zip(prompts, comps):
        ids.append([pad_id] * (P - len(p)) + p + c + [pad_id] * (C - len(c)))
        mask.append([0] * (P - len(p)) + [1] * (len(p) + len(c)) + [0] * (C - len(c)))
        labels.append(c + [IGNORE] * (C - len(c)))
    mask_t = torch.tensor(mask)
    positions = (mask_t.cumsum(-1) - 1).clamp(min=0)
    return Batch(torch.tensor(ids), mask_t, positions, torch.tensor(labels), sum(len(c) for c in comps))


def completion_logits(model, batch: Batch, vocab: int) -> torch.Tensor:
    """[B, C, vocab] logits predicting each completion token (teacher columns sliced to `vocab`)."""
    C = batch.labels.shape[1]
    kw = dict(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        position_ids=batch.position_ids,
        use_cache=False,
    )
    try:
        logits = model(**kw, logits_to_keep=C + 1).logits[:, :-1]
    except TypeError:  # models without logits_to_keep: full logits, then slice
        logits = model(**kw).logits[:, -C - 1 : -1]
    return logits[..., :vocab]


@dataclass
class TeacherTargets:
    """What the loss knows of the teacher on one batch: its full logits (a local teacher), or its
    top-k and actual-token log-probs at temperature 1 (a teacher server, learner.teacher)."""

    logits: torch.Tensor | None = None  # [B, C, V] teacher logits predicting each completion token
    topk_ids: torch.Tensor | None = None  # [B, C, k] the teacher's top-k ids (0 on padding)
    topk_logprobs: torch.Tensor | None = None  # [B, C, k] their log-probs (0 on padding)
    token_logprobs: torch.Tensor | None = None  # [B, C] log p_teacher(label) (0 on padding)


def distill_loss(
    student,
    teacher,
    batch: Batch,
    *,
    vocab: int,
    beta: float,
    temperature: float,
    teacher_device=None,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Generalized JSD (mean over completion tokens) of the student to a local teacher model on `batch`."""
    s_logits = completion_logits(student, batch, vocab)
    with torch.no_grad():
        tb = batch if teacher_device is None else batch.to(teacher_device)
        t_logits = completion_logits(teacher, tb, vocab).to(s_logits.device)
    return targets_loss(
        s_logits,
        TeacherTargets(logits=t_logits),
        batch.labels,
        loss_type="jsd",
        beta=beta,
        temperature=temperature,
        chunk_size=chunk_size,
    )


def targets_loss(
    s_logits: torch.Tensor,
    targets: TeacherTargets,
    labels: torch.Tensor,
    *,
    loss_type: str,
    beta: float,
    temperature: float,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """The training loss (mean over completion tokens) from the student's logits and the teacher's targets.

    loss_type "jsd": the full-vocabulary generalized JSD with teacher logits, else the top-k + tail
    JSD over the teacher's k + 1 bins; "sampled_rkl": the sampled-token reverse KL on the labels
    (the student's own samples), from the teacher's actual-token log-probs (a local teacher's are
    taken from its logits at `temperature`).
    """
    if loss_type == "sampled_rkl":
        t_tok = targets.token_logprobs
        if t_tok is None:
            with torch.no_grad():
                t_lp = torch.log_softmax(targets.logits.float() / temperature, dim=-1)
                t_tok = t_lp.gather(-1, labels.clamp_min(0)[..., None])[..., 0]
        return sampled_rkl_loss(s_logits, labels, t_tok, labels=labels, temperature=temperature)
    if targets.logits is not None:
        return generalized_jsd_loss(
            s_logits,
            targets.logits,
            labels=labels,
            beta=beta,
            temperature=temperature,
            reduction="batchmean",
            chunk_size=chunk_size,
        )
    return topk_tail_jsd_loss(
        s_logits, targets.topk_ids, targets.topk_logprobs, labels=labels, beta=beta, temperature=temperature
    )
