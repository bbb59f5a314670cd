"""How far the student is from the teacher, on held-out prompts.

Figures (per completion token, at temperature 1 — the models' own distributions):

* ``eval/student/*``: on the student's own samples (from the rollout server at the current version):
  generalized JSD at the training beta, forward KL(teacher||student), reverse KL(student||teacher),
  the teacher's NLL of the samples, distinct-2 and mean length;
* ``eval/teacher_text/*``: the same divergences on teacher-written completions (the dataset's, or
  teacher samples for prompt-only data), plus the student's and the teacher's NLL of them (the
  teacher's own reference figure) and their distinct-2.

With a teacher server (`--teacher_url`) the divergences are taken over the teacher's top-k + tail
bins, lower bounds of the full-vocabulary ones, and named so: ``eval/student/jsd_top20_tail`` etc.

`evaluate` is a plain function of models and token ids, so other code (the demo report) can call it
with completions from anywhere.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from learner.loss import divergence, topk_tail_bins
from learner.step import IGNORE, collate, completion_logits, fit_completions


def distinct_n(seqs: list[list[int]], n: int = 2) -> float:
    """Unique n-grams / all n-grams over `seqs` (0 when there are none); low values mean repetition."""
    grams = [tuple(s[i : i + n]) for s in seqs for i in range(len(s) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


DIVERGENCES = ("jsd", "kl_fwd", "kl_rev")  # named with the teacher's metric suffix (top-k + tail)


def _bin_divergences(s: torch.Tensor, t: torch.Tensor, beta: float) -> dict[str, torch.Tensor]:
    """jsd (at beta), kl_fwd, kl_rev per row of log-probs `s` (student), `t` (teacher) over the same bins."""
    kl_fwd = divergence(s, t, 0.0).sum(-1)  # KL(teacher || student)
    kl_rev = divergence(s, t, 1.0).sum(-1)  # KL(student || teacher)
    jsd = {0.0: kl_fwd, 1.0: kl_rev}.get(float(beta))
    if jsd is None:
        jsd = divergence(s, t, beta).sum(-1)
    return {"jsd": jsd, "kl_fwd": kl_fwd, "kl_rev": kl_rev}


def token_divergences(
    s_logits: torch.Tensor, t_logits: torch.Tensor, labels: torch.Tensor, beta: float
) -> dict[str, torch.Tensor]:
    """Per-token divergences over the positions where labels != IGNORE, each a 1-D tensor [n]."""
    mask = labels != IGNORE
    s = torch.log_softmax(s_logits[mask].float(), dim=-1)
    t = torch.log_softmax(t_logits[mask].float(), dim=-1)
    ids = labels[mask][:, None]
    return {
        **_bin_divergences(s, t, beta),
        "teacher_nll": -t.gather(-1, ids)[:, 0],
        "student_nll": -s.gather(-1, ids)[:, 0],
    }


def topk_tail_token_divergences(
    s_logits: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_logprobs: torch.Tensor,
    token_logprobs: torch.Tensor,
    labels: torch.Tensor,
    beta: float,
) -> dict[str, torch.Tensor]:
    """`token_divergences` against a teacher known by its top-k (a teacher server): jsd, kl_fwd and
    kl_rev over the k + 1 bins (lower bounds of the full-vocabulary values); the two NLLs are exact
    (the server sends the actual token's log-prob)."""
    mask = labels != IGNORE
    s_bins, t_bins = topk_tail_bins(s_logits[mask], topk_ids[mask], topk_logprobs[mask], 1.0)
    s = torch.log_softmax(s_logits[mask].float(), dim=-1)
    return {
        **_bin_divergences(s_bins, t_bins, beta),
        "teacher_nll": -token_logprobs[mask].float(),
        "student_nll": -s.gather(-1, labels[mask][:, None])[:, 0],
    }


@torch.no_grad()
def divergences(
    student,
    teacher,
    prompts,
    completions,
    *,
    beta: float,
    vocab: int,
    pad_id: int,
    max_length: int,
    batch_size: int,
    device,
    teacher_device=None,
) -> dict[str, float]:
    """Token-weighted means of `token_divergences` over all (prompt, completion) pairs.

    `teacher` is a HF model or a `learner.teacher` teacher; with a teacher server every batch is
    sent for scoring first, and the divergences are the top-k + tail ones (`topk_tail_token_divergences`).
    """
    if not hasattr(teacher, "collect"):  # a plain model
        from learner.teacher import LocalTeacher

        teacher = LocalTeacher(teacher, teacher_device or device, vocab=vocab)
    sums: dict[str, float] = {}
    n = 0
    chunks = []
    for i in range(0, len(prompts), batch_size):
        p, c = (
            prompts[i : i + batch_size],
            fit_completions(prompts[i : i + batch_size], completions[i : i + batch_size], max_length),
        )
        batch = collate(p, c, pad_id, max_length)
        if batch is not None:
            chunks.append((batch.to(device), teacher.submit(p, c, max_length)))
    was_training = student.training
    student.eval()
    try:
        for batch, pending in chunks:
            s_logits = completion_logits(student, batch, vocab)
            tgt = teacher.collect(pending, batch)
            for row in range(
                batch.labels.shape[0]
            ):  # one row at a time keeps the fp32 [C, V] temporaries small
                if tgt.logits is not None:
                    d = token_divergences(s_logits[row], tgt.logits[row], batch.labels[row], beta)
                else:
                    d = topk_tail_token_divergences(
                        s_logits[row],
                        tgt.topk_ids[row],
                        tgt.topk_logprobs[row],
                        tgt.token_logprobs[row],
                        batch.labels[row],
                        beta,
                    )
                for k, v in d.items():
                    sums[k] = sums.get(k, 0.0) + v.sum().item()
            n += batch.n_tokens
    finally:
        student.train(was_training)
    return {k: v / n for k, v in sums.items()} if n else {}


def evaluate(
    student,
    teacher,
    prompts: list[list[int]],
    *,
    student_completions: list[list[int]],
    teacher_completions: list[list[int]],
    text_teacher: Any = None,
    **kw: Any,
) -> dict[str, float]:
    """All evaluation figures, as a flat {name: value} dict (see the module docstring).

    `text_teacher` scores the teacher-written completions (default: `teacher`; a
    learner.teacher.MemoTeacher scores that fixed text once for all evaluations). `kw` are
    `divergences`' keywords (beta, vocab, pad_id, max_length, batch_size, device, teacher_device),
    used for both sets of completions.
    """
    on_student = divergences(student, teacher, prompts, student_completions, **kw)
    on_teacher = divergences(student, text_teacher or teacher, prompts, teacher_completions, **kw)
    sfx = getattr(teacher, "metric_suffix", "")  # "_top20_tail" against a teacher server's top-20

    def name(k: str) -> str:
        return k + sfx if k in DIVERGENCES else k

    out = {
        f"eval/student/{name(k)}": on_student[k]
        for k in ("jsd", "kl_fwd", "kl_rev", "teacher_nll")
        if k in on_student
    }
    out["eval/student/distinct2"] = distinct_n(student_completions)
    out["eval/student/length"] = sum(map(len, student_completions)) / max(1, len(student_completions))
    out.update(
        {
            f"eval/teacher_text/{name(k)}": on_teacher[k]
            for k in ("jsd", "kl_fwd", "kl_rev", "student_nll", "teacher_nll")
            if k in on_teacher
        }
    )
    out["eval/teacher_text/distinct2"] = distinct_n(teacher_completions)
    return out


def write_samples(
    path: str | Path,
    step: int,
    tokenizer,
    prompts_text: list[str],
    student_completions,
    teacher_completions,
    k: int = 4,
) -> None:
    """Append a few completions side by side (student vs teacher) to samples.jsonl."""
    with open(path, "a") as f:
        for p, s, t in list(zip(prompts_text, student_completions, teacher_completions))[:k]:
            row = {
                "step": step,
                "prompt": p,
                "student": tokenizer.decode(s, skip_special_tokens=True),
                "teacher": tokenizer.decode(t, skip_special_tokens=True),
            }
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
