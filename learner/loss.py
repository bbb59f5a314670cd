"""The generalized Jensen-Shannon divergence of GKD (Agarwal et al. 2024), as a pure function.

Same signature and values as TRL's ``GKDTrainer.generalized_jsd_loss``; two paths compute it:

* the plain path: a few lines of autograd-differentiated torch, used for small inputs and for
  ``reduction="none"``;
* the chunked path: a ``torch.autograd.Function`` that walks the tokens in small chunks, computes
  the loss AND its analytic gradient for each chunk, and keeps only the gradient buffer. Autograd
  over the plain path keeps about 14 full ``[N, V]`` fp32 intermediates alive at once (8.9 GB at
  N=1024, V=151936); the chunked path keeps one ``[N, V]`` buffer (in the student's dtype) plus a
  few cache-sized chunk temporaries.

The module knows nothing about models or batches: it maps two logit tensors (and a label mask)
to a scalar.

Gradient (per token; u = student_logits / T, p = softmax(u), s = log p, q = teacher probs, t = log q;
the derivative with respect to the logits is dL/du divided by T):

* beta = 0, L = KL(q || p) = sum q (t - s):   dL/du = p - q
* beta = 1, L = KL(p || q) = sum p (s - t):   dL/du = p * (s - t - L)
* 0 < beta < 1, mixture M = beta q + (1 - beta) p, m = log M,
  L = beta KL(q || M) + (1 - beta) KL(p || M). Differentiating in p (treated as free) gives
  dL/dp_i = (1 - beta)(s_i - m_i) + (1 - beta) - (1 - beta) M_i / M_i = (1 - beta)(s_i - m_i);
  the softmax Jacobian (dp_i/du_j = p_i (delta_ij - p_j)) turns a gradient g in p into p * (g - sum p g):
  dL/du = (1 - beta) p * (s - m - KL(p || M)).

Note beta = 0 and beta = 1 are special-cased exactly as TRL does: as beta -> 0 the mixture formula
tends to 0, not to KL(q || p).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100
# Above this many student-logit elements (16 MiB of fp32) the chunked path is used.
CHUNK_THRESHOLD = 1 << 22
# Default chunk: about 4 Mi elements (16 MiB fp32) per temporary, 27 rows at V=151936; the ~7
# live chunk temporaries (~110 MiB) are small next to the [N, V] gradient. Smaller chunks fit the
# L3 better, but each torch op is an OpenMP parallel region whose barrier is costly when the cores
# are oversubscribed (the rollout server shares them): measured on 2 busy cores (load ~7),
# fwd+bwd took 148 / 123 / 110 / 94 ns per element at 6 / 13 / 27 / 48 rows per chunk.
CHUNK_ELEMENTS = 1 << 22
_REDUCTIONS = ("batchmean", "sum", "mean", "none")


def generalized_jsd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor | None = None,
    beta: float = 0.5,
    temperature: float = 1.0,
    reduction: str = "batchmean",
    num_items_in_batch: int | torch.Tensor | None = None,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Generalized JSD between student and teacher next-token distributions.

    Args:
        student_logits: ``[B, T, V]`` (or ``[N, V]``) student logits.
        teacher_logits: same leading shape; its vocabulary may be larger than the student's, the
            extra columns (padding rows of the teacher's embedding) are sliced off.
        labels: ``[B, T]`` (or ``[N]``); positions equal to -100 are ignored. None: all count.
        beta: 0 gives KL(teacher || student), 1 gives KL(student || teacher), in between the
            generalized JSD with mixture ``beta * teacher + (1 - beta) * student``.
        temperature: both logits are divided by it before the softmax.
        reduction: "batchmean" (with labels: sum / max(counted tokens, 1); without: sum /
            ``student_logits.shape[0]``, i.e. per sequence for ``[B, T, V]``, per token for
            ``[N, V]``, like ``F.kl_div``), "sum", "mean" (sum / (counted tokens * V)) or "none"
            (per-element divergences: ``[n_valid, V]`` with labels, else the logits' shape).
        num_items_in_batch: if given, the result is sum / num_items_in_batch whatever the
            reduction (the global token count under gradient accumulation, as in TRL).
        chunk_size: tokens per chunk for the memory-light fused path. None: that path is used
            automatically for big inputs (``numel >= CHUNK_THRESHOLD``) when the teacher needs no
            gradient and the reduction is not "none".

    Returns:
        The loss: a float32 scalar, or a float32 tensor for reduction="none". With labels and no
        counted token, "batchmean" gives 0 (and a zero gradient), as in TRL.
    """
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    teacher_logits = _match_vocab(student_logits, teacher_logits)
    if labels is not None and labels.shape != student_logits.shape[:-1]:
        raise ValueError(f"labels {tuple(labels.shape)} do not match logits {tuple(student_logits.shape)}")
    mask = None if labels is None else labels != IGNORE_INDEX
    if num_items_in_batch is not None:
        reduction = "sum"  # divided by num_items_in_batch below
    if chunk_size is not None or _wants_chunked(student_logits, teacher_logits, reduction):
        if reduction == "none" or teacher_logits.requires_grad or student_logits.dim() not in (2, 3):
            raise ValueError(
                "the chunked path needs 2-D/3-D logits, reduction != 'none' and a teacher without grad"
            )
        chunk = chunk_size or max(1, CHUNK_ELEMENTS // student_logits.shape[-1])
        want_grad = torch.is_grad_enabled() and student_logits.requires_grad
        loss = _ChunkedJSD.apply(
            student_logits, teacher_logits, mask, beta, temperature, reduction, chunk, want_grad
        )
    else:
        loss = _plain_jsd(student_logits, teacher_logits, mask, beta, temperature, reduction)
    if num_items_in_batch is not None:
        loss = loss / num_items_in_batch
    return loss


def _match_vocab(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    if student.shape[:-1] != teacher.shape[:-1]:
        raise ValueError(f"student {tuple(student.shape)} and teacher {tuple(teacher.shape)} differ")
    v = student.shape[-1]
    if teacher.shape[-1] < v:
        raise ValueError(f"teacher vocabulary {teacher.shape[-1]} is smaller than the student's {v}")
    return teacher[..., :v]


def _wants_chunked(student: torch.Tensor, teacher: torch.Tensor, reduction: str) -> bool:
    return reduction != "none" and not teacher.requires_grad and student.numel() >= CHUNK_THRESHOLD


def _row_divergence(s: torch.Tensor, t: torch.Tensor, beta: float) -> torch.Tensor:
    """Per-element divergence from student/teacher log-probs (same shape). Autograd-friendly."""
    if beta == 0.0:
        return t.exp() * (t - s)
    if beta == 1.0:
        return s.exp() * (s - t)
    # log M in log space: the probabilities underflow long before the log-probs do.
    m = torch.logaddexp(s + math.log1p(-beta), t + math.log(beta))
    return beta * t.exp() * (t - m) + (1.0 - beta) * s.exp() * (s - m)


def _plain_jsd(student, teacher, mask, beta, temperature, reduction) -> torch.Tensor:
    s = F.log_softmax(student.float() / temperature, dim=-1)
    t = F.log_softmax(teacher.float() / temperature, dim=-1)
    div = _row_divergence(s, t, beta)
    if mask is not None:
        div = div[mask]
    if reduction == "none":
        return div
    total = div.sum()
    return total / _denominator(student, mask, reduction)


def _denominator(student: torch.Tensor, mask: torch.Tensor | None, reduction: str) -> float | torch.Tensor:
    if reduction == "batchmean":  # TRL's: an empty mask divides by 1, not 0
        return max(student.shape[0], 1) if mask is None else mask.sum().clamp_min(1)
    if reduction == "mean":
        tokens = student.numel() // student.shape[-1] if mask is None else mask.sum()
        return tokens * student.shape[-1]
    return 1.0


def _chunk_loss_and_grad(s_logits, t_logits, beta, temperature, grad_out, scale):
    """Summed loss of a chunk of rows; writes scale * d loss_sum / d s_logits into ``grad_out``.

    Computes in fp32 whatever the input dtype. ``grad_out`` is a view into the gradient buffer
    (the last op writes straight into it, casting to its dtype) or None for a value-only pass;
    ``scale`` is 1 / the reduction's denominator, folded in here to save a pass over [N, V].
    Written for speed on CPU: in-place ops, ``vecdot`` instead of ``(a * b).sum()``, and the
    mixture's log taken in probability space (``torch.logaddexp`` costs ~4x a ``log``); where
    both probabilities underflow, M is clamped to the smallest normal float, which changes only
    terms weighted by p or q < 1e-38.
    """
    s = _log_softmax(s_logits, temperature)
    t = _log_softmax(t_logits, temperature)
    p, q = s.exp(), t.exp()
    if beta == 0.0:  # KL(q || p) = q.t - q.s;  dL/du = p - q
        loss = _dot(q, t.sub_(s))
        if grad_out is not None:
            torch.sub(p, q, out=grad_out)
            grad_out.mul_(scale / temperature)
        return loss
    if beta == 1.0:  # KL(p || q) = p.(s - t);  dL/du = p * (s - t - KL)
        return _mixture_tail(p, s.sub_(t), scale / temperature, grad_out)
    m = p.mul(1.0 - beta).add_(q, alpha=beta).clamp_min_(torch.finfo(torch.float32).tiny).log_()
    kl_teacher = _dot(q, t.sub_(m))
    kl_student = _mixture_tail(p, s.sub_(m), scale * (1.0 - beta) / temperature, grad_out)
    return beta * kl_teacher + (1.0 - beta) * kl_student


def _mixture_tail(p, d, coef, grad_out):
    """sum over rows of KL_row = p.d, and grad_out = coef * p * (d - KL_row). Clobbers d."""
    row = torch.linalg.vecdot(p, d)
    if grad_out is not None:
        torch.mul(p, d.sub_(row[:, None]), out=grad_out)
        grad_out.mul_(coef)
    return row.sum()


def _log_softmax(logits, temperature):
    x = logits.float()
    return F.log_softmax(x if temperature == 1.0 else x / temperature, dim=-1)


def _dot(a, b):
    # Not torch.dot: BLAS sdot accumulates in fp32 lanes (relative error ~1e-5 over 1M terms);
    # a row-wise vecdot and then sum keeps ~1e-7.
    return torch.linalg.vecdot(a, b).sum()


def _chunk_spans(x: torch.Tensor, chunk: int):
    """Yield (batch index, start, stop) spans of at most `chunk` rows, never crossing a batch row.

    Walking the batch dimension explicitly keeps every chunk a view even when the logits are a
    non-contiguous slice (e.g. ``logits[:, p - 1 : -1]``), where a flatten would copy [N, V].
    """
    for b in range(x.shape[0]):
        for start in range(0, x.shape[1], chunk):
            yield b, start, min(start + chunk, x.shape[1])


class _ChunkedJSD(torch.autograd.Function):
    """Fused forward+backward: forward computes the gradient chunk by chunk and keeps only it."""

    @staticmethod
    def forward(ctx, student, teacher, mask, beta, temperature, reduction, chunk, want_grad):
        s3, t3 = (student, teacher) if student.dim() == 3 else (student[None], teacher[None])
        m3 = None if mask is None else mask.view(s3.shape[:-1])
        grad = torch.empty(s3.shape, dtype=student.dtype, device=student.device) if want_grad else None
        denom = _denominator(student, mask, reduction)
        scale = 1.0 / float(denom) if float(denom) else float("nan")  # "mean" of nothing is nan, as in TRL
        total = torch.zeros((), dtype=torch.float64, device=student.device)  # hundreds of chunks
        for b, lo, hi in _chunk_spans(s3, chunk):
            s_c, t_c, g_c = s3[b, lo:hi], t3[b, lo:hi], None if grad is None else grad[b, lo:hi]
            rows = None if m3 is None else m3[b, lo:hi].nonzero().squeeze(1)
            if rows is None or rows.numel() == hi - lo:
                total += _chunk_loss_and_grad(s_c, t_c, beta, temperature, g_c, scale)
                continue
            # Gather the counted rows; the ignored ones get a zero gradient.
            g_rows = None if g_c is None else g_c.new_empty((rows.numel(), s_c.shape[-1]))
            if rows.numel():
                total += _chunk_loss_and_grad(s_c[rows], t_c[rows], beta, temperature, g_rows, scale)
            if g_c is not None:
                g_c.zero_().index_copy_(0, rows, g_rows)
        ctx.grad = None if grad is None else grad.view(student.shape)
        return (total / denom).float()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output):
        grad, ctx.grad = ctx.grad, None  # drop ctx's reference so autograd may steal the buffer
        if grad is None:
            raise RuntimeError("chunked JSD backward ran twice (retain_graph is not supported)")
        if not (grad_output.numel() == 1 and grad_output.item() == 1.0):
            grad.mul_(grad_output.to(grad.dtype))  # in place: no second [N, V] buffer
        return grad, None, None, None, None, None, None, None
