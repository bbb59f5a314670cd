"""Tests for learner.loss: the generalized JSD against hand-written KLs, TRL, and its own chunked path."""

import warnings

import pytest
import torch
import torch.nn.functional as F

from learner import loss as loss_mod
from learner.loss import generalized_jsd_loss

B, T, V = 3, 11, 50
BETAS = [0.0, 0.1, 0.5, 0.9, 1.0]
TEMPERATURES = [0.5, 1.0, 2.0]
# fp32 agreement: 1e-5 absolute, plus 1e-6 relative for per-sequence sums of ~60 (ulp ~4e-6).
TOL = dict(atol=1e-5, rtol=1e-6)


@pytest.fixture(scope="module")
def trl_jsd():
    """TRL's reference implementation; trl is a dev dependency, so an import error fails the tests."""
    with warnings.catch_warnings():  # "trl.experimental is unstable": that is why we pin trl
        warnings.simplefilter("ignore")
        try:
            from trl.experimental.gkd import GKDTrainer
        except ImportError:
            from trl.trainer.gkd_trainer import GKDTrainer
    return GKDTrainer.generalized_jsd_loss


def _logits(seed: int, shape=(B, T, V), scale: float = 3.0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=gen) * scale


def _labels(seed: int, shape=(B, T)) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, V, shape, generator=gen)
    labels[torch.rand(shape, generator=gen) < 0.4] = -100
    labels[0, :3] = -100  # a prompt-like prefix
    return labels


@pytest.mark.parametrize("beta", BETAS)
def test_identical_inputs_give_zero(beta):
    x = _logits(0)
    assert generalized_jsd_loss(x, x.clone(), beta=beta).abs().item() < 1e-6
    assert generalized_jsd_loss(x, x.clone(), beta=beta, chunk_size=4).abs().item() < 1e-6


def test_beta0_is_forward_kl():
    s, t = _logits(1), _logits(2)
    # Without labels "batchmean" divides by the batch size, like F.kl_div(reduction="batchmean").
    expected = F.kl_div(F.log_softmax(s, -1), F.softmax(t, -1), reduction="batchmean")
    torch.testing.assert_close(generalized_jsd_loss(s, t, beta=0.0), expected, **TOL)


def test_beta1_is_reverse_kl():
    s, t = _logits(1), _logits(2)
    p, log_p, log_q = F.softmax(s, -1), F.log_softmax(s, -1), F.log_softmax(t, -1)
    expected = (p * (log_p - log_q)).sum() / B
    torch.testing.assert_close(generalized_jsd_loss(s, t, beta=1.0), expected, **TOL)


def test_middle_beta_is_mixture_jsd_by_hand():
    s, t, beta = _logits(1), _logits(2), 0.3
    p, q = F.softmax(s, -1), F.softmax(t, -1)
    m = beta * q + (1 - beta) * p
    kl = lambda a, b: (a * (a.log() - b.log())).sum()  # noqa: E731
    expected = (beta * kl(q, m) + (1 - beta) * kl(p, m)) / (B * T)
    every_token = torch.zeros(B, T, dtype=torch.long)  # labels present, none ignored: per-token mean
    torch.testing.assert_close(generalized_jsd_loss(s, t, every_token, beta=beta), expected, **TOL)


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize("beta", BETAS)
def test_matches_trl(trl_jsd, beta, temperature, masked):
    s, t = _logits(3), _logits(4)
    labels = _labels(5) if masked else None
    expected = trl_jsd(s, t, labels=labels, beta=beta, temperature=temperature)
    ours = generalized_jsd_loss(s, t, labels=labels, beta=beta, temperature=temperature)
    chunked = generalized_jsd_loss(s, t, labels=labels, beta=beta, temperature=temperature, chunk_size=4)
    torch.testing.assert_close(ours, expected, **TOL)
    torch.testing.assert_close(chunked, expected, **TOL)


@pytest.mark.parametrize("reduction", ["batchmean", "sum", "mean", "none"])
@pytest.mark.parametrize("masked", [False, True])
def test_each_reduction_matches_trl(trl_jsd, reduction, masked):
    s, t = _logits(6), _logits(7)
    labels = _labels(8) if masked else None
    expected = trl_jsd(s, t, labels=labels, beta=0.5, reduction=reduction)
    ours = generalized_jsd_loss(s, t, labels=labels, beta=0.5, reduction=reduction)
    assert ours.shape == expected.shape
    torch.testing.assert_close(ours, expected, **TOL)


def test_reductions_relate_to_the_sum():
    s, t, labels = _logits(6), _logits(7), _labels(8)
    n_valid = int((labels != -100).sum())
    total = generalized_jsd_loss(s, t, labels=labels, reduction="sum")
    per_element = generalized_jsd_loss(s, t, labels=labels, reduction="none")
    assert per_element.shape == (n_valid, V)
    torch.testing.assert_close(per_element.sum(), total)
    torch.testing.assert_close(generalized_jsd_loss(s, t, labels=labels), total / n_valid)
    torch.testing.assert_close(
        generalized_jsd_loss(s, t, labels=labels, reduction="mean"), total / (n_valid * V)
    )
    torch.testing.assert_close(generalized_jsd_loss(s, t), generalized_jsd_loss(s, t, reduction="sum") / B)
    assert generalized_jsd_loss(s, t, reduction="none").shape == (B, T, V)
    with pytest.raises(ValueError):
        generalized_jsd_loss(s, t, reduction="avg")


@pytest.mark.parametrize("chunk_size", [None, 4])
def test_num_items_in_batch_and_empty_mask_match_trl(trl_jsd, chunk_size):
    s, t, labels = _logits(33), _logits(34), _labels(35)
    expected = trl_jsd(s, t, labels=labels, num_items_in_batch=torch.tensor(40))
    ours = generalized_jsd_loss(
        s, t, labels=labels, num_items_in_batch=torch.tensor(40), chunk_size=chunk_size
    )
    torch.testing.assert_close(ours, expected, atol=1e-6, rtol=0)
    none = torch.full((B, T), -100)  # e.g. a completion truncated away: 0, not nan
    student = s.clone().requires_grad_(True)
    empty = generalized_jsd_loss(student, t, labels=none, chunk_size=chunk_size)
    assert empty.item() == trl_jsd(s, t, labels=none).item() == 0.0
    empty.backward()
    assert (student.grad == 0).all()
    mean_of_nothing = generalized_jsd_loss(s, t, labels=none, reduction="mean", chunk_size=chunk_size)
    assert mean_of_nothing.isnan() and trl_jsd(s, t, labels=none, reduction="mean").isnan()


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_temperature_divides_both_logits(beta):
    s, t = _logits(9), _logits(10)
    scaled = generalized_jsd_loss(s, t, beta=beta, temperature=2.0)
    torch.testing.assert_close(scaled, generalized_jsd_loss(s / 2.0, t / 2.0, beta=beta), atol=1e-6, rtol=0)
    # Softer distributions are closer: a high temperature shrinks the divergence towards 0.
    assert generalized_jsd_loss(s, t, beta=beta, temperature=100.0) < 0.01 * generalized_jsd_loss(
        s, t, beta=beta
    )


@pytest.mark.parametrize("chunk_size", [None, 4])
def test_masked_positions_are_ignored(chunk_size):
    s, t, labels = _logits(11), _logits(12), _labels(13)
    masked = labels == -100
    base = generalized_jsd_loss(s, t, labels=labels, chunk_size=chunk_size)
    s2, t2 = s.clone(), t.clone()
    s2[masked] = _logits(14)[masked] * 10
    t2[masked] = _logits(15)[masked] * 10
    torch.testing.assert_close(generalized_jsd_loss(s2, t2, labels=labels, chunk_size=chunk_size), base)
    # ... and the result is the mean over the counted rows alone.
    valid = ~masked
    torch.testing.assert_close(base, generalized_jsd_loss(s[valid], t[valid]), atol=1e-6, rtol=0)
    # Changing a counted position does change it (the check above can fail).
    b, tok = valid.nonzero()[0].tolist()
    s2[b, tok] += _logits(16, (V,))
    assert not torch.allclose(generalized_jsd_loss(s2, t2, labels=labels, chunk_size=chunk_size), base)


def test_jsd_is_symmetric_at_half():
    s, t = _logits(17), _logits(18)
    torch.testing.assert_close(generalized_jsd_loss(s, t, beta=0.5), generalized_jsd_loss(t, s, beta=0.5))
    # Not at other betas: the test is not vacuous.
    assert not torch.allclose(generalized_jsd_loss(s, t, beta=0.1), generalized_jsd_loss(t, s, beta=0.1))


@pytest.mark.parametrize("beta", BETAS)
def test_non_negative(beta):
    for seed in range(5):
        s, t = _logits(100 + seed, scale=10.0), _logits(200 + seed, scale=10.0)
        per_token = generalized_jsd_loss(s, t, beta=beta, reduction="none").sum(-1)
        assert (per_token >= -1e-6).all()
        assert generalized_jsd_loss(s, t, beta=beta, chunk_size=5) >= -1e-6


@pytest.mark.parametrize("chunk_size", [None, 4])
def test_teacher_extra_vocab_is_sliced_off(chunk_size):
    s, t = _logits(19), _logits(20)
    padded = torch.cat([t, torch.full((B, T, 14), 50.0)], dim=-1)  # padding columns with huge logits
    expected = generalized_jsd_loss(s, t, chunk_size=chunk_size)
    torch.testing.assert_close(generalized_jsd_loss(s, padded, chunk_size=chunk_size), expected)
    with pytest.raises(ValueError):
        generalized_jsd_loss(padded, s)  # a teacher smaller than the student is an error


def _value_and_grad(student, teacher, **kwargs):
    student = student.detach().clone().requires_grad_(True)
    value = generalized_jsd_loss(student, teacher, **kwargs)
    value.backward()
    return value.detach(), student.grad


@pytest.mark.parametrize("reduction", ["batchmean", "sum", "mean"])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize("beta", [0.0, 0.3, 0.5, 1.0])
def test_chunked_matches_plain_values_and_grads(beta, temperature, masked, reduction):
    s, t = _logits(21), _logits(22)
    kwargs = dict(
        labels=_labels(23) if masked else None, beta=beta, temperature=temperature, reduction=reduction
    )
    plain_value, plain_grad = _value_and_grad(s, t, **kwargs)
    for chunk_size in (4, 64):  # 4 does not divide T; 64 is bigger than T
        value, grad = _value_and_grad(s, t, chunk_size=chunk_size, **kwargs)
        torch.testing.assert_close(value, plain_value, **TOL)
        torch.testing.assert_close(grad, plain_grad, **TOL)
        if masked:
            assert (grad[kwargs["labels"] == -100] == 0).all()


def test_chunked_handles_2d_and_non_contiguous_inputs():
    full_s, t, labels = _logits(24, (B, T + 5, V)), _logits(25), _labels(26)
    s = full_s[:, 2 : 2 + T]  # a shifted slice, as the learner takes it: not contiguous
    assert not s.is_contiguous()
    plain_value, plain_grad = _value_and_grad(s, t, labels=labels)
    value, grad = _value_and_grad(s, t, labels=labels, chunk_size=3)
    torch.testing.assert_close(value, plain_value, **TOL)
    torch.testing.assert_close(grad, plain_grad, **TOL)
    flat = [x.reshape(B * T, -1) for x in (s, t)]
    value2d, grad2d = _value_and_grad(*flat, labels=labels.reshape(-1), chunk_size=3)
    torch.testing.assert_close(value2d, plain_value, **TOL)
    torch.testing.assert_close(grad2d, plain_grad.reshape(B * T, V), **TOL)


def test_chunked_backward_scales_by_grad_output_and_keeps_dtype():
    s, t = _logits(27), _logits(28)
    _, grad = _value_and_grad(s, t, chunk_size=4)
    student = s.clone().requires_grad_(True)
    (3.0 * generalized_jsd_loss(student, t, chunk_size=4)).backward()
    torch.testing.assert_close(student.grad, 3.0 * grad)
    half = s.to(torch.bfloat16).requires_grad_(True)
    generalized_jsd_loss(half, t.to(torch.bfloat16), chunk_size=4).backward()
    assert half.grad.dtype == torch.bfloat16
    torch.testing.assert_close(half.grad.float(), grad, atol=2e-3, rtol=0.05)


def test_chunked_without_grad_and_backward_twice():
    s, t = _logits(29), _logits(30)
    with torch.no_grad():
        value = generalized_jsd_loss(s.requires_grad_(True), t, chunk_size=4)
    torch.testing.assert_close(value, generalized_jsd_loss(s.detach(), t))
    loss = generalized_jsd_loss(s, t, chunk_size=4)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="twice"):
        loss.backward()


def test_big_inputs_dispatch_to_chunked_path(monkeypatch):
    s, t = _logits(31).requires_grad_(True), _logits(32)
    assert "Chunked" not in type(generalized_jsd_loss(s, t).grad_fn).__name__
    monkeypatch.setattr(loss_mod, "CHUNK_THRESHOLD", s.numel())
    assert "Chunked" in type(generalized_jsd_loss(s, t).grad_fn).__name__
    # A teacher that wants a gradient, or reduction="none", keeps the plain (autograd) path.
    assert "Chunked" not in type(generalized_jsd_loss(s, t.requires_grad_(True)).grad_fn).__name__
    assert generalized_jsd_loss(s, t.detach(), reduction="none").shape == s.shape
