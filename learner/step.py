"""One micro-batch: build the tensors, run student and teacher, take the JSD on completion tokens.

Layout: prompts are LEFT-padded and completions RIGHT-padded, so every completion starts at the same
column P. Only the logits that predict completion tokens (columns P-1 .. P+C-2) are computed
(`logits_to_keep`): no [B, T, V] logits over the prompt, no gather copy. Position ids are derived
from the attention mask so left padding does not shift positions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from learner.loss import generalized_jsd_loss

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


def collate(
    prompts: list[list[int]], completions: list[list[int]], pad_id: int, max_length: int
) -> Batch | None:
    """Tensors for one micro-batch; None when no completion has a token to learn from."""
    comps = [c[: max(0, max_length - len(p))] for p, c in zip(prompts, completions)]
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
    reduction: str = "batchmean",
) -> torch.Tensor:
    """Generalized JSD of the student to the teacher on `batch`: the mean over its completion
    tokens ("batchmean"), or their sum ("sum": the optimizer step divides by all its tokens)."""
    s_logits = completion_logits(student, batch, vocab)
    with torch.no_grad():
        tb = batch if teacher_device is None else batch.to(teacher_device)
        t_logits = completion_logits(teacher, tb, vocab).to(s_logits.device)
    return generalized_jsd_loss(
        s_logits,
        t_logits,
        labels=batch.labels,
        beta=beta,
        temperature=temperature,
        reduction=reduction,
        chunk_size=chunk_size,
    )
