"""Tests for the sparse-teacher losses of learner.loss: top-k + tail JSD and sampled reverse KL."""

import pytest
import torch
import torch.nn.functional as F

from learner.loss import (
    divergence,
    generalized_jsd_loss,
    log_rest_mass,
    sampled_rkl_loss,
    topk_tail_jsd_loss,
)

N, V = 24, 40
BETAS = [0.0, 0.1, 0.5, 0.9, 1.0]


def _logits(seed: int, shape=(N, V), scale: float = 3.0, dtype=torch.float64) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=gen, dtype=torch.float64) * scale).to(dtype)


def _teacher_topk(t_logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """What a teacher server sends: its top-k ids and their log-probs (temperature 1)."""
    lp, ids = F.log_softmax(t_logits, dim=-1).topk(k, dim=-1)
    return ids, lp


def _full_jsd(s_logits, t_logits, beta, temperature=1.0):
    """The full-vocabulary generalized JSD, mean over tokens, in the logits' own dtype."""
    s = F.log_softmax(s_logits / temperature, dim=-1)
    t = F.log_softmax(t_logits, dim=-1)
    return divergence(s, t, beta).sum(-1).mean()


@pytest.mark.parametrize("beta", BETAS)
def test_reference_is_the_full_loss(beta):
    """The float64 reference below is generalized_jsd_loss (which computes in float32)."""
    s, t = _logits(1), _logits(2)
    ref = _full_jsd(s, t, beta)
    got = generalized_jsd_loss(s.float(), t.float(), beta=beta)
    torch.testing.assert_close(got.double(), ref, atol=1e-5, rtol=1e-6)


@pytest.mark.parametrize("beta", BETAS)
def test_k_equal_v_is_the_full_jsd_in_value_and_gradient(beta):
    s, t = _logits(3).requires_grad_(), _logits(4)
    ids, lp = _teacher_topk(t, V)
    sparse = topk_tail_jsd_loss(s, ids, lp, beta=beta)
    full = _full_jsd(s, t, beta)
    (g_sparse,) = torch.autograd.grad(sparse, s)
    (g_full,) = torch.autograd.grad(full, s)
    assert abs(sparse.item() - full.item()) < 1e-6
    assert (g_sparse - g_full).abs().max().item() < 1e-6


@pytest.mark.parametrize("beta", BETAS)
def test_k_equal_v_in_float32_is_close(beta):
    """In float32 the rest bins are rounding noise (~1e-7 mass); the docstring bounds their effect."""
    s, t = _logits(5, dtype=torch.float32), _logits(6, dtype=torch.float32)
    ids, lp = _teacher_topk(t, V)
    sparse = topk_tail_jsd_loss(s, ids, lp, beta=beta)
    assert abs(sparse.item() - _full_jsd(s.double(), t.double(), beta).item()) < 2e-5


@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("k", [1, 3, 10, V - 1])
def test_never_exceeds_the_full_value(beta, k):
    for seed in range(20):
        s, t = _logits(100 + seed, scale=1.0 + seed % 4), _logits(200 + seed, scale=1.0 + seed % 3)
        ids, lp = _teacher_topk(t, k)
        per_token = topk_tail_jsd_loss(s, ids, lp, beta=beta, reduction="none")
        full = divergence(F.log_softmax(s, -1), F.log_softmax(t, -1), beta).sum(-1)
        # k = V - 1 leaves one token in the rest bin: equality, up to float64 rounding. Each rest
        # mass is 1 - (sum of k probabilities), off by up to ~k * 2.2e-16 absolutely; in the
        # divergence that error is divided by the other side's rest mass (the log-ratio), so a tiny
        # teacher rest bin next to a larger student one amplifies it. Allow exactly that much.
        s_rest = 1 - F.softmax(s, -1).gather(-1, ids).sum(-1)
        t_rest = 1 - lp.exp().sum(-1)
        ratio = (s_rest / t_rest).abs() + (t_rest / s_rest).abs()
        tol = 1e-9 + 1e-13 * torch.nan_to_num(ratio, posinf=0.0)
        assert (per_token <= full + tol).all(), (seed, (per_token - full - tol).max().item())
        assert (per_token >= -1e-12).all()


@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("k", [1, 5, V])
def test_zero_when_student_equals_teacher(beta, k):
    x = _logits(7).requires_grad_()
    ids, lp = _teacher_topk(x.detach(), k)
    loss = topk_tail_jsd_loss(x, ids, lp, beta=beta)
    (g,) = torch.autograd.grad(loss, x)
    assert abs(loss.item()) < 1e-12
    assert g.abs().max().item() < 1e-12


def test_temperature_divides_the_student_only():
    s, t = _logits(8), _logits(9)
    ids, lp = _teacher_topk(t, V)
    got = topk_tail_jsd_loss(s, ids, lp, beta=0.5, temperature=2.0)
    torch.testing.assert_close(got, _full_jsd(s, t, 0.5, temperature=2.0), atol=1e-10, rtol=0)


def test_labels_mask_positions_and_3d_shapes():
    s, t = _logits(10, shape=(2, 6, V)), _logits(11, shape=(2, 6, V))
    labels = torch.zeros(2, 6, dtype=torch.long)
    labels[0, 4:] = -100
    ids, lp = _teacher_topk(t, 4)
    got = topk_tail_jsd_loss(s, ids, lp, labels=labels, beta=0.3, reduction="none")
    keep = labels != -100
    want = topk_tail_jsd_loss(s[keep], ids[keep], lp[keep], beta=0.3, reduction="none")
    torch.testing.assert_close(got, want)
    assert got.shape == (10,)
    mean = topk_tail_jsd_loss(s, ids, lp, labels=labels, beta=0.3)
    torch.testing.assert_close(mean, want.mean())


def test_rest_mass_is_precise_and_never_negative():
    # 1 - (1 - 1e-12) loses everything in float32 probability space; -expm1 keeps it.
    lp = torch.tensor([[-1e-12]], dtype=torch.float64)
    assert abs(log_rest_mass(lp).exp().item() - 1e-12) < 1e-20
    over = torch.tensor([[-0.5, -0.5]], dtype=torch.float32)  # sums to > 1: rounding gone wrong
    assert torch.isfinite(log_rest_mass(over)).all()


def test_bad_inputs_are_refused():
    s, t = _logits(12), _logits(13)
    ids, lp = _teacher_topk(t, 3)
    with pytest.raises(ValueError, match="outside"):
        topk_tail_jsd_loss(s, ids + V, lp)
    with pytest.raises(ValueError, match="do not match"):
        topk_tail_jsd_loss(s, ids[:, :2], lp)
    with pytest.raises(ValueError, match="beta"):
        topk_tail_jsd_loss(s, ids, lp, beta=1.5)


# ---------------------------------------------------------------- sampled reverse KL


def test_sampled_rkl_value_is_the_log_ratio():
    s, t = _logits(20), _logits(21)
    x = torch.randint(0, V, (N,), generator=torch.Generator().manual_seed(0))
    t_lp = F.log_softmax(t, -1).gather(-1, x[:, None])[:, 0]
    per = sampled_rkl_loss(s, x, t_lp, reduction="none")
    want = F.log_softmax(s, -1).gather(-1, x[:, None])[:, 0] - t_lp
    torch.testing.assert_close(per, want)


def test_sampled_rkl_gradient_per_sample_is_its_definition():
    """grad = (log p_s(x) - log p_t(x)) * d log p_s(x) / d logits = d(x) * (onehot(x) - p_s) / T."""
    temperature = 0.7
    s, t = _logits(22).requires_grad_(), _logits(23)
    x = torch.randint(0, V, (N,), generator=torch.Generator().manual_seed(1))
    t_lp = F.log_softmax(t, -1).gather(-1, x[:, None])[:, 0]
    (g,) = torch.autograd.grad(sampled_rkl_loss(s, x, t_lp, temperature=temperature, reduction="sum"), s)
    log_p = F.log_softmax(s.detach() / temperature, -1)
    d = log_p.gather(-1, x[:, None]) - t_lp[:, None]
    want = d * (F.one_hot(x, V) - log_p.exp()) / temperature
    torch.testing.assert_close(g, want, atol=1e-12, rtol=0)


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_sampled_rkl_expected_gradient_is_the_reverse_kl_gradient(temperature):
    """Exact enumeration on a small vocabulary: sum_x p_s(x) grad L(x) = grad KL(p_s || p_t)."""
    v = 6
    s = _logits(24, shape=(1, v)).requires_grad_()
    t_log = F.log_softmax(_logits(25, shape=(1, v)), -1)
    p = F.softmax(s.detach() / temperature, -1)[0]
    expected = torch.zeros_like(s)
    for x in range(v):
        xs = torch.tensor([x])
        (g,) = torch.autograd.grad(sampled_rkl_loss(s, xs, t_log[:, x], temperature=temperature), s)
        expected += p[x] * g
    log_p = F.log_softmax(s / temperature, -1)
    kl = (log_p.exp() * (log_p - t_log)).sum()
    (g_kl,) = torch.autograd.grad(kl, s)
    torch.testing.assert_close(expected, g_kl, atol=1e-12, rtol=0)


def test_sampled_rkl_ignores_masked_positions():
    s, t = _logits(26, shape=(2, 5, V)), _logits(27, shape=(2, 5, V))
    x = torch.randint(0, V, (2, 5), generator=torch.Generator().manual_seed(2))
    labels = x.clone()
    labels[1, 3:] = -100
    t_lp = F.log_softmax(t, -1).gather(-1, x[..., None])[..., 0]
    got = sampled_rkl_loss(s, x, t_lp, labels=labels)
    keep = labels != -100
    torch.testing.assert_close(got, sampled_rkl_loss(s[keep], x[keep], t_lp[keep]))
