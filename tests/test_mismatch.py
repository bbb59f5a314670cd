"""learner.mismatch: the per-token policy-mismatch figures and the check right after a push."""

from __future__ import annotations

import math

import pytest
import torch

from learner import mismatch as mm
from learner.step import IGNORE


def test_sampled_logprobs_equal_log_softmax_at_the_labels_in_chunks(monkeypatch):
    monkeypatch.setattr(mm, "CHUNK_ROWS", 3)  # 2 x 5 rows: several chunks, a ragged last one
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 11, generator=g)
    labels = torch.randint(0, 11, (2, 5), generator=g)
    labels[1, 3:] = IGNORE
    for t in (1.0, 0.7):
        got = mm.sampled_logprobs(logits, labels, temperature=t)
        want = torch.log_softmax(logits / t, -1).gather(-1, labels.clamp(min=0)[..., None])[..., 0]
        want = want.masked_fill(labels == IGNORE, 0.0)
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, want)
    assert not mm.sampled_logprobs(logits.requires_grad_(), labels).requires_grad


def test_sampled_logprobs_of_bf16_logits_are_fp32():
    logits = torch.randn(1, 4, 7).to(torch.bfloat16)
    labels = torch.tensor([[1, 2, 3, 4]])
    got = mm.sampled_logprobs(logits, labels)
    want = torch.log_softmax(logits.float(), -1).gather(-1, labels[..., None])[..., 0]
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want)


def test_align_cuts_each_row_to_its_completion_and_pads_with_zero():
    labels = torch.tensor([[5, 6, 7], [8, IGNORE, IGNORE]])
    got = mm.align([[-0.1, -0.2, -0.3, -0.4], [-1.0, -2.0]], labels)  # row 0 was cut to max_length
    torch.testing.assert_close(got, torch.tensor([[-0.1, -0.2, -0.3], [-1.0, 0.0, 0.0]]))
    with pytest.raises(ValueError, match="row 0"):
        mm.align([[-0.1], [-1.0]], labels)
    with pytest.raises(ValueError, match="1 rows"):
        mm.align([[-0.1, -0.2, -0.3]], labels)


def test_token_mismatch_figures_by_hand():
    learner = torch.tensor([[-1.0, -2.0, -0.5, 9.0]])
    server = torch.tensor([[-1.0, -1.0, -1.5, 0.0]])
    mask = torch.tensor([[True, True, True, False]])  # the last token is padding
    st = mm.token_mismatch(learner, server, mask)
    d = [0.0, -1.0, 1.0]
    assert st.tokens == 3
    assert st.mean_abs == pytest.approx(2 / 3)
    f = st.figures()
    assert f["mismatch/kl_k3"] == pytest.approx(sum(math.exp(x) - 1 - x for x in d) / 3)
    assert f["mismatch/frac_abs_gt_0.5"] == pytest.approx(2 / 3)
    assert f["mismatch/mean_abs_logprob"] == pytest.approx(2 / 3)


def test_k3_is_tiny_and_non_negative_for_fp32_agreement():
    g = torch.Generator().manual_seed(1)
    server = -torch.rand(1, 1000, generator=g) * 5
    learner = server + torch.randn(1, 1000, generator=g) * 1e-6
    st = mm.token_mismatch(learner, server, torch.ones(1, 1000, dtype=torch.bool))
    k3 = st.figures()["mismatch/kl_k3"]
    assert 0 <= k3 < 1e-11  # ~ d^2 / 2
    assert st.mean_abs < 1e-5 and st.n_big == 0


def test_k3_estimates_kl_server_to_learner_when_sampling_from_the_server():
    g = torch.Generator().manual_seed(2)
    p = torch.softmax(torch.randn(50, generator=g), -1)  # server
    q = torch.softmax(torch.randn(50, generator=g), -1)  # learner
    x = torch.multinomial(p, 200_000, replacement=True, generator=g)
    st = mm.token_mismatch(q.log()[x][None], p.log()[x][None], torch.ones(1, x.numel(), dtype=torch.bool))
    kl = float((p * (p.log() - q.log())).sum())
    assert st.figures()["mismatch/kl_k3"] == pytest.approx(kl, rel=0.03)


def test_stats_add_up_and_no_tokens_gives_no_figures():
    a = mm.MismatchStats(tokens=2, sum_abs=1.0, sum_k3=0.5, n_big=1)
    a.add(mm.MismatchStats(tokens=2, sum_abs=0.0, sum_k3=0.0, n_big=0))
    assert a.mean_abs == 0.25 and a.figures()["mismatch/frac_abs_gt_0.5"] == 0.25
    assert mm.MismatchStats().figures() == {}


def test_bound_is_dtype_aware():
    assert mm.bound(torch.float32, "float32") == mm.FP32_MEAN_ABS_BOUND
    assert mm.bound(torch.float32, "bfloat16") == mm.LOW_PRECISION_MEAN_ABS_BOUND
    assert mm.bound(torch.bfloat16, "float32") == mm.LOW_PRECISION_MEAN_ABS_BOUND
    assert mm.FP32_MEAN_ABS_BOUND < mm.LOW_PRECISION_MEAN_ABS_BOUND


def _stats(mean_abs: float, n: int = 10) -> mm.MismatchStats:
    return mm.MismatchStats(tokens=n, sum_abs=mean_abs * n)


def test_monitor_checks_only_the_first_batch_at_a_just_pushed_version():
    mon = mm.MismatchMonitor(torch.float32, "float32")
    bad = _stats(0.05)
    assert mon.observe(bad, server_version=1, learner_version=1) == ""  # nothing pushed yet: no check
    mon.pushed(2)
    assert mon.observe(bad, server_version=1, learner_version=2) == ""  # an older version's batch
    line = mon.observe(bad, server_version=2, learner_version=2)
    assert "policy version 2" in line and "learner's version 2" in line and "0.05" in line
    assert "\n" not in line
    assert mon.observe(bad, server_version=2, learner_version=2) == ""  # checked once per push
    mon.pushed(3)
    assert mon.observe(_stats(1e-6), server_version=3, learner_version=3) == ""  # healthy
    assert mon.pending is None
    mon.pushed(4)
    assert mon.observe(bad, server_version=4, learner_version=5) == ""  # trained since: not comparable
    # sync_steps > 1: an optimizer step without a push keeps the version but changes the weights.
    mon.pushed(6)
    mon.stepped()
    assert mon.observe(bad, server_version=6, learner_version=6) == ""
    figures = mon.take()
    assert figures["mismatch/tokens"] == 70
    assert mon.take() == {}


def test_monitor_bf16_bound_tolerates_rounding_but_not_a_wrong_policy():
    mon = mm.MismatchMonitor(torch.bfloat16, "bfloat16")
    mon.pushed(1)
    assert mon.observe(_stats(0.013), 1, 1) == ""  # the healthy bf16 figure measured on CPU
    mon.pushed(2)
    assert "bound 0.05" in mon.observe(_stats(0.087), 2, 2)


def test_monitor_without_hard_check_keeps_figures_and_never_fails():
    mon = mm.MismatchMonitor(torch.float32, "float32", hard_check=False)
    mon.pushed(1)
    assert mon.observe(_stats(0.5), 1, 1) == ""
    assert mon.take()["mismatch/mean_abs_logprob"] == pytest.approx(0.5)


def test_tf32_uses_the_low_precision_bound():
    assert mm.bound(torch.float32, "float32", tf32=True) == mm.LOW_PRECISION_MEAN_ABS_BOUND
    assert "with TF32" in mm.after_push_problem(
        _stats(0.5),
        server_version=1,
        learner_version=1,
        learner_dtype=torch.float32,
        serving_dtype="float32",
        tf32=True,
    )
