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
to a scalar. One kernel, `divergence_parts` (a pure function of student and teacher log-prob rows
and beta), defines the divergence for every path here (plain, chunked, top-k + tail) and for
`learner.evaluate`; the chunked path builds its analytic gradient from the kernel's student part.

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
# Default chunk: about 4 Mi elements (16 MiB fp32) per temporary, 27 rows at V=151936; the few
# live chunk temporaries (~100 MiB) are small next to the [N, V] gradient. Smaller chunks fit the
# L3 better, but each torch op is an OpenMP parallel region whose barrier is costly when the cores
# are oversubscribed (the rollout server shares them), so on 2 busy cores larger chunks are faster.
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


def divergence_parts(
    s: torch.Tensor, t: torch.Tensor, beta: float
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The divergence kernel: generalized JSD(beta) terms from student and teacher log-probs.

    Args:
        s: student log-probs, rows over the same bins as `t` (a vocabulary, or top-k + rest bins).
        t: teacher log-probs, same shape (and dtype) as `s`.
        beta: 0 gives KL(q || p), 1 gives KL(p || q); in between, with the mixture
            M = beta q + (1 - beta) p, beta KL(q || M) + (1 - beta) KL(p || M).

    Returns:
        ``(student_part, teacher_part)``, per element, same shape as `s`: the student's terms
        ``(1 - beta) p (s - log M)`` (``p (s - t)`` at beta = 1, None at beta = 0) and the
        teacher's ``beta q (t - log M)`` (``q (t - s)`` at beta = 0, None at beta = 1). Their sum
        over the last dim is the per-row divergence. Pure and autograd-friendly; `divergence` adds
        the parts, the chunked path also builds its analytic gradient from the student part.
    """
    if beta == 0.0:
        return None, t.exp() * (t - s)
    if beta == 1.0:
        return s.exp() * (s - t), None
    # log M in log space: the probabilities underflow long before the log-probs do.
    m = torch.logaddexp(s + math.log1p(-beta), t + math.log(beta))
    return (1.0 - beta) * s.exp() * (s - m), beta * t.exp() * (t - m)


def divergence(s: torch.Tensor, t: torch.Tensor, beta: float) -> torch.Tensor:
    """Per-element generalized JSD(beta) from log-probs `s` (student) and `t` (teacher), same shape;
    each row sums to that row's divergence. The sum of `divergence_parts`."""
    student, teacher = divergence_parts(s, t, beta)
    if student is None:
        return teacher
    return student if teacher is None else student + teacher


def _plain_jsd(student, teacher, mask, beta, temperature, reduction) -> torch.Tensor:
    s = F.log_softmax(student.float() / temperature, dim=-1)
    t = F.log_softmax(teacher.float() / temperature, dim=-1)
    div = divergence(s, t, beta)
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
    The gradient comes from the kernel's student part (see the module docstring): with
    a = student_part, dL/du = a - p * sum(a) for beta > 0, and p - q at beta = 0.
    """
    s = _log_softmax(s_logits, temperature)
    t = _log_softmax(t_logits, temperature)
    student, teacher = divergence_parts(s, t, beta)
    row_student = None if student is None else student.sum(-1)
    loss = sum(x.sum(-1).sum() for x in (row_student, teacher) if x is not None)
    if grad_out is not None:
        p = s.exp_()
        if student is None:
            torch.sub(p, t.exp_(), out=grad_out)
        else:
            torch.sub(student, p.mul_(row_student[:, None]), out=grad_out)
        grad_out.mul_(scale / temperature)
    return loss


def _log_softmax(logits, temperature):
    x = logits.float()
    return F.log_softmax(x if temperature == 1.0 else x / temperature, dim=-1)


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


# ---------------------------------------------------------------- a sparse (remote) teacher

# Log of the smallest normal float32: the floor for a bin's log-mass. A bin whose mass rounds to
# 0 or below (the rest bin when the top-k covers almost everything: 1 - sum is then ~1e-7 of
# rounding noise, of either sign) keeps a finite log, so 0 * log 0 terms stay 0 instead of nan.
_LOG_TINY = math.log(torch.finfo(torch.float32).tiny)


def log_rest_mass(topk_logprobs: torch.Tensor) -> torch.Tensor:
    """log(1 - sum(exp(topk_logprobs))) over the last dim, floored at log(float32 tiny).

    -expm1(logsumexp) keeps the relative precision of a small rest mass (1 - sum in probability
    space loses it); tiny negative rounding results are clamped to the floor.
    """
    covered = torch.logsumexp(topk_logprobs, dim=-1).clamp_max(0.0)
    return torch.log((-torch.expm1(covered)).clamp_min(math.exp(_LOG_TINY)))


def topk_tail_bins(
    student_logits: torch.Tensor,
    topk_ids: torch.Tensor,
    teacher_topk_logprobs: torch.Tensor,
    temperature: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Student and teacher log-masses over k + 1 bins: the teacher's top-k ids, then the rest.

    Args:
        student_logits: ``[n, V]``; divided by `temperature`, then a full log-softmax (the only
            ``[n, V]`` intermediate).
        topk_ids: ``[n, k]`` distinct token ids < V (the teacher's top-k at each position).
        teacher_topk_logprobs: ``[n, k]`` the teacher's log-probs of those ids.

    Returns:
        ``(s_bins, t_bins)``, both ``[n, k + 1]`` log-masses (float32, or float64 for float64
        logits); column k is the rest.
    """
    s = F.log_softmax(_at_least_fp32(student_logits) / temperature, dim=-1)
    s_top = s.gather(-1, topk_ids)
    t_top = _at_least_fp32(teacher_topk_logprobs).to(s_top.dtype)
    s_bins = torch.cat([s_top, log_rest_mass(s_top)[:, None]], dim=-1)
    t_bins = torch.cat([t_top, log_rest_mass(t_top)[:, None]], dim=-1)
    return s_bins, t_bins


def topk_tail_jsd_loss(
    student_logits: torch.Tensor,
    topk_ids: torch.Tensor,
    teacher_topk_logprobs: torch.Tensor,
    *,
    beta: float = 0.5,
    labels: torch.Tensor | None = None,
    temperature: float = 1.0,
    reduction: str = "batchmean",
) -> torch.Tensor:
    """Generalized JSD(beta) between the student and a teacher known only by its top-k.

    The vocabulary is partitioned into k + 1 bins: one per teacher top-k id at that position, plus
    one "rest" bin. The teacher's rest mass is 1 - sum of its top-k probabilities; the student's is
    1 - sum of its own probabilities (from its full local softmax) over the same ids. The
    divergence is the generalized JSD of these two coarse-grained distributions, computed exactly
    by the same per-bin kernel as the full-vocabulary loss, so it is exact at every beta including
    0 (KL(teacher || student)) and 1 (KL(student || teacher)). By the data-processing inequality
    (the generalized JSD is an f-divergence) it never exceeds the full-vocabulary value, and it
    equals it when the top-k is the whole vocabulary.

    Precision: in float32 each rest mass carries ~1e-7 absolute rounding error, so a rest bin
    below that is noise; its contribution is then at most ~1e-7 * |log float32 tiny| ~ 1e-5.
    Pass float64 logits for more.

    Args:
        student_logits: ``[B, T, V]`` or ``[N, V]`` student logits (with grad).
        topk_ids: same leading shape, ``[..., k]``: the teacher's top-k token ids (distinct, < V).
        teacher_topk_logprobs: same shape as `topk_ids`: the teacher's log-probs of those ids, at
            temperature 1 (vLLM's prompt logprobs).
        labels: ``[B, T]`` / ``[N]``; positions equal to -100 are ignored. None: all count.
        beta: mixture weight of the teacher, in [0, 1] (as in `generalized_jsd_loss`).
        temperature: divides the student's logits only. The teacher's log-probs are taken as they
            are; tempering them exactly would need the teacher's whole tail, so callers with a
            remote teacher must refuse temperature != 1 (`shared.config.validate` does).
        reduction: "batchmean" (sum / counted tokens, at least 1), "sum" or "none" (``[n]``
            per-token divergences of the counted positions).

    Returns:
        A float32 scalar (float64 for float64 logits), or ``[n]`` for "none".
    """
    if reduction not in ("batchmean", "sum", "none"):
        raise ValueError(f"reduction must be batchmean, sum or none, got {reduction!r}")
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    if topk_ids.shape != teacher_topk_logprobs.shape or topk_ids.shape[:-1] != student_logits.shape[:-1]:
        raise ValueError(
            f"top-k ids {tuple(topk_ids.shape)} / logprobs {tuple(teacher_topk_logprobs.shape)} "
            f"do not match student logits {tuple(student_logits.shape)}"
        )
    v = student_logits.shape[-1]
    mask = _token_mask(student_logits, labels)
    s_logits, ids, t_top = student_logits[mask], topk_ids[mask], teacher_topk_logprobs[mask]
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= v):
        raise ValueError(f"teacher top-k ids outside the student's vocabulary [0, {v})")
    s_bins, t_bins = topk_tail_bins(s_logits, ids, t_top, temperature)
    per_token = divergence(s_bins, t_bins, beta).sum(-1)
    return _reduce_tokens(per_token, reduction)


def sampled_rkl_loss(
    student_logits: torch.Tensor,
    token_ids: torch.Tensor,
    teacher_token_logprobs: torch.Tensor,
    labels: torch.Tensor | None = None,
    *,
    temperature: float = 1.0,
    reduction: str = "batchmean",
) -> torch.Tensor:
    """Sampled-token reverse KL, trained with the score-function (REINFORCE) gradient.

    On the student's own samples x ~ p_s, d(x) = log p_s(x) - log p_t(x) is a one-sample estimate
    of KL(p_s || p_t) per token (as Tinker and prime-rl use it). Its gradient is
    E_x[d(x) * grad log p_s(x)] (the other term, E_x[grad log p_s(x)], is 0), so the loss
    returned is ``d + stopgrad(d) * (log p_s(x) - stopgrad(log p_s(x)))``: its value is the
    estimate, its gradient ``stopgrad(d) * grad log p_s(x)``. Like theirs it is per-token: the
    effect of a token on later positions' contexts is not credited. Valid only when the tokens are
    the student's own samples at this policy (on-policy, lmbda = 1).

    Args:
        student_logits: ``[B, T, V]`` or ``[N, V]`` (with grad).
        token_ids: ``[B, T]`` / ``[N]`` the sampled tokens (ignored where labels == -100; they
            may be the labels themselves).
        teacher_token_logprobs: same shape: log p_t(token) at temperature 1 (one number per token:
            all a remote teacher needs to send).
        labels: positions equal to -100 are ignored; None: all count.
        temperature: divides the student's logits.
        reduction: "batchmean" (mean over counted tokens), "sum" or "none" (``[n]``).

    Returns:
        A float32 scalar (or ``[n]`` for "none").
    """
    if reduction not in ("batchmean", "sum", "none"):
        raise ValueError(f"reduction must be batchmean, sum or none, got {reduction!r}")
    mask = _token_mask(student_logits, labels)
    logits = _at_least_fp32(student_logits[mask]) / temperature
    ids = token_ids[mask].long()
    # log p_s(x) without materialising a second [n, V]: logit(x) - logsumexp(logits).
    logp = logits.gather(-1, ids[:, None])[:, 0] - torch.logsumexp(logits, dim=-1)
    d = (logp - teacher_token_logprobs[mask].to(logp.dtype)).detach()
    per_token = d + d * (logp - logp.detach())
    return _reduce_tokens(per_token, reduction)


def _at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype == torch.float64 else x.float()


def _token_mask(student_logits: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
    lead = student_logits.shape[:-1]
    if labels is None:
        return torch.ones(lead, dtype=torch.bool, device=student_logits.device)
    if labels.shape != lead:
        raise ValueError(f"labels {tuple(labels.shape)} do not match logits {tuple(student_logits.shape)}")
    return labels != IGNORE_INDEX


def _reduce_tokens(per_token: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "none":
        return per_token
    total = per_token.sum()
    return total if reduction == "sum" else total / max(per_token.numel(), 1)
