"""bench/gpu_check.py: the prepared GPU check, as a tiny CPU smoke test and (with CUDA) in full."""

from __future__ import annotations

import json

import pytest
import torch

from bench import gpu_check


@pytest.mark.slow
def test_gpu_check_tiny_runs_on_cpu_and_our_loss_matches_trls(tmp_path):
    out = tmp_path / "gpu_check.json"
    report = gpu_check.main(["--tiny", "--device", "cpu", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    train = report["train"]
    assert train["steps"] == 2 and len(train["losses"]) == 2 and train["s_per_step"] > 0
    assert train["trainable_params"] > 0 and train["peak_gb"] is None  # not measured on CPU
    loss = report["loss"]
    assert loss["loss_abs_diff"] < 1e-5 and loss["grad_max_abs_diff"] < 1e-6
    drift = report["merge_drift"]
    for k in ("bf16_pristine", "fp32_pristine"):
        assert 0.0 <= drift[k]["share_unchanged"] <= 1.0


def test_served_delta_counts_what_a_bf16_merge_rounds_away():
    """bench.gpu_check.served_delta (also bench.drift's weight figure): a delta under half a bf16
    ulp of W0 is served as bf16(W0) by a fp32-pristine merge; one of many ulps survives."""
    w0 = torch.full((8, 8), 1.0)  # bf16 ulp at 1.0 is 2**-7
    tiny, big = torch.full((8, 8), 2.0**-10), torch.full((8, 8), 2.0**-3)
    lost = gpu_check.served_delta([(w0, tiny)])["fp32_pristine"]
    assert lost["share_unchanged"] == 1.0 and lost["rel_err_of_served_delta"] == pytest.approx(1.0)
    kept = gpu_check.served_delta([(w0, big)])
    for k in ("fp32_pristine", "bf16_pristine"):
        assert kept[k]["share_unchanged"] == 0.0 and kept[k]["rel_err_of_served_delta"] < 1e-6
    half = gpu_check.served_delta([(w0, tiny), (w0, big)])["fp32_pristine"]
    assert half["share_unchanged"] == 0.5


def test_the_full_check_refuses_cpu():
    with pytest.raises(SystemExit):
        gpu_check.main(["--device", "cpu"])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_check_full_on_cuda(tmp_path):
    report = gpu_check.main(["--out", str(tmp_path / "gpu_check.json")])
    assert report["train"]["peak_gb"] > 0
    assert report["loss"]["loss_abs_diff"] < 1e-3
    assert report["loss"]["ours"]["extra_peak_gb"] < report["loss"]["trl"]["extra_peak_gb"]
