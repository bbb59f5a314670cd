"""Defaults a GPU user expects, checked on CPU: dtype resolution, TF32, eager mode, message size."""

from __future__ import annotations

import pytest
import torch

from learner.models import enable_tf32, resolve_torch_dtype
from rollout_server.engine import engine_args
from rollout_server.settings import ServerSettings, with_sync_mode
from shared.config import ConfigError, parse_args
from shared.messages import DEFAULT_MAX_MESSAGE_BYTES, LoraSpec, PushAdapter
from shared.transport import RemoteError, connect
from shared.transport.ray_transport import RayClient

CUDA, CPU = torch.device("cuda"), torch.device("cpu")


def test_torch_dtype_auto_is_bf16_on_cuda_and_fp32_elsewhere():
    assert resolve_torch_dtype("auto", CUDA) == torch.bfloat16
    assert resolve_torch_dtype("auto", torch.device("cuda", 1)) == torch.bfloat16
    assert resolve_torch_dtype("auto", CPU) == torch.float32
    # told otherwise: as told, on either device
    assert resolve_torch_dtype("float32", CUDA) == torch.float32
    assert resolve_torch_dtype("bfloat16", CPU) == torch.bfloat16
    assert resolve_torch_dtype("float16", CUDA) == torch.float16


def test_sync_mode_auto_is_lora_when_serving_bf16_and_merged_in_fp32(monkeypatch):
    """A bf16 merge rounds small deltas away (bench.drift), so a bf16/fp16 server defaults to vLLM's
    LoRA; a float32 server merges. `auto` serves bf16 on CUDA and float32 on CPU."""

    def mode(dtype: str, **kw) -> str:
        return with_sync_mode(ServerSettings(model="m", dtype=dtype, **kw)).sync_mode

    assert ServerSettings(model="m").sync_mode == "auto"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert (mode("auto"), mode("float32"), mode("bfloat16"), mode("float16")) == (
        "merged",
        "merged",
        "lora",
        "lora",
    )
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert (mode("auto"), mode("float32")) == ("lora", "merged")
    assert engine_args(ServerSettings(model="m"), on_cpu=False)["enable_lora"] is True
    # told: as told, whatever the dtype
    assert (mode("bfloat16", sync_mode="merged"), mode("float32", sync_mode="lora")) == ("merged", "lora")


def test_tf32_is_enabled_for_cuda_only():
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        assert enable_tf32(CPU) is False
        assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
        assert enable_tf32(CUDA) is True
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _cfg(tmp_path, *extra):
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "a", "completion": "b"}\n')
    argv = ["--model_name_or_path", "s/m", "--teacher_model_name_or_path", "t/m", "--dataset_name", str(data)]
    return parse_args([*argv, *extra])[0]


def test_learner_flags_torch_dtype_default_auto_and_max_message_mb(tmp_path):
    cfg = _cfg(tmp_path)
    assert cfg.model.torch_dtype == "auto"
    assert cfg.rollout.max_message_mb is None
    cfg = _cfg(tmp_path, "--torch_dtype", "float32", "--max_message_mb", "1024")
    assert (cfg.model.torch_dtype, cfg.rollout.max_message_mb) == ("float32", 1024)
    with pytest.raises(ConfigError, match="max_message_mb=0 is invalid"):
        _cfg(tmp_path, "--max_message_mb", "0")


def test_enforce_eager_defaults_on_for_cpu_off_for_gpu():
    s = ServerSettings(model="m")
    assert engine_args(s, on_cpu=True)["enforce_eager"] is True
    assert engine_args(s, on_cpu=False)["enforce_eager"] is False
    assert engine_args(ServerSettings(model="m", enforce_eager=True), on_cpu=False)["enforce_eager"] is True


def _push(n_bytes: int) -> PushAdapter:
    return PushAdapter(
        version=1,
        adapter=b"\0" * n_bytes,
        sha256="0" * 64,
        lora=LoraSpec(r=1, lora_alpha=1, target_modules=[]),
    )


def test_max_message_mb_reaches_the_zmq_client_and_bounds_what_it_sends(free_port):
    url = f"tcp://127.0.0.1:{free_port()}"  # nobody listens: the size check comes before any send
    with connect(url, timeout_s=5) as c:
        assert c.max_bytes == DEFAULT_MAX_MESSAGE_BYTES
    with connect(url, timeout_s=5, max_message_mb=1) as c:
        assert c.max_bytes == 1024 * 1024
        with pytest.raises(RemoteError, match="max_message_mb=1"):
            c.push_adapter(_push(2 * 1024 * 1024), timeout_s=5)


def test_the_ray_client_takes_max_message_mb_too():
    import inspect

    assert "max_message_mb" in inspect.signature(RayClient).parameters
