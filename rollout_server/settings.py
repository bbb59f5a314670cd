"""The rollout server's typed settings (flags of `gkd-rollout-server`, and what the Ray job passes)."""

from __future__ import annotations

from typing import Literal

import msgspec

from shared.messages import DEFAULT_MAX_MESSAGE_BYTES


class ServerSettings(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    model: str  # base model directory (HF format) or hub id; the student's base weights
    host: str = "127.0.0.1"  # bind address; anything but loopback requires a token
    port: int = 5555  # ZeroMQ ROUTER port (tcp://host:port)
    token: str | None = None  # shared secret checked on every request (env GKD_TOKEN)
    sync_mode: Literal["merged", "lora"] = "merged"  # merge adapters into base weights, or vLLM LoRA
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = (
        "auto"  # serving dtype (auto: bf16 on CUDA, fp32 on CPU... see engine)
    )
    max_model_len: int | None = None  # longest prompt+completion; None: the model's own limit
    gpu_memory_utilization: float = 0.85  # CUDA only: share of GPU memory vLLM may take
    kv_cache_gb: float = 1.0  # CPU only: KV cache size (VLLM_CPU_KVCACHE_SPACE)
    max_lora_rank: int = 64  # largest adapter rank accepted (also vLLM's max_lora_rank in lora mode)
    max_message_mb: int = DEFAULT_MAX_MESSAGE_BYTES // (1024 * 1024)  # larger messages are refused unread
    http_port: int | None = None  # OpenAI-compatible endpoint port (None: off)
    enforce_eager: bool | None = None  # no CUDA graphs / compile; None: on for CPU, off on GPU
    seed: int = 0  # engine seed
    trust_remote_code: bool = False
    max_num_seqs: int = 64  # concurrent sequences per engine step
    min_version_wait_s: float = 300.0  # how long a request with min_version may wait for that push
    tensor_parallel_size: int = 1  # vLLM tensor parallelism (GPUs per engine)
    # dtype of each worker's pristine copy of the adaptable weights, which every merged push starts
    # from; float32 keeps W0 + s*B*A from rounding back to W0 (a bf16 copy would lose small deltas).
    pristine_dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    # "student": sample the student and take pushed adapters; "teacher": serve a frozen teacher that
    # answers score requests (and generates), and refuses every push.
    role: Literal["student", "teacher"] = "student"
    max_logprobs: int = 128  # the largest top-k a score request may ask for (vLLM's max_logprobs)

    def needs_token(self) -> bool:
        return self.host not in ("127.0.0.1", "localhost", "::1")
