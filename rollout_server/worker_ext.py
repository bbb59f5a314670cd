"""Weight sync inside vLLM's workers: methods vLLM injects into each worker (`worker_extension_cls`).

The service calls them through `collective_rpc`, so every worker (one per tensor-parallel rank)
runs them on its own device:

- `gkd_setup` reads a pristine copy of every weight an adapter may touch, from the model's own
  safetensors, onto the worker's device (in `--pristine_dtype`, fp32 by default);
- `gkd_apply` takes a pushed adapter as safetensors bytes (tensors sent through `collective_rpc`
  would arrive as lists) and reloads W0 + s * B @ A, computed in fp32 from the pristine copy and
  cast to the serving dtype, into the running model. A "full" push serves its whole tensors as
  they are; the next LoRA push serves base + adapter again (the base values come back).

The reload goes through the worker's `reload_weights`, which wraps `model.load_weights` in vLLM's
layerwise reload helpers: a bare `load_weights` fails on CPU, where linear weights live in packed
oneDNN handles. vLLM's weight loaders take full-size HF tensors and keep each rank's shard, so under
tensor parallelism each rank loads its own part. The service validated every name, shape and dtype
before calling: an exception between the helpers' initialize and finalize leaves the model
half-restored and the engine dies on its next step.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch


class WorkerExt:
    """Mixed into vLLM's worker class; `self` is the worker (model_runner, vllm_config, device)."""

    def gkd_setup(self: Any, pristine_dtype: str, sync_mode: str) -> int:
        """Hold the pristine weights (merged mode only: lora mode never merges); returns their count."""
        import torch

        from rollout_server.weights import read_pristine

        self._gkd_dirty: set[str] = set()  # weights the engine holds merged (not pristine) right now
        self._gkd_full: set[str] = set()  # weights a full push replaced since the last LoRA push
        model = self.model_runner.model
        packed = dict(getattr(model, "packed_modules_mapping", {}) or {})
        # sub-module name -> all parts of the fused vLLM layer it belongs to (q_proj -> q, k, v).
        self._gkd_siblings = {part: list(parts) for parts in packed.values() for part in parts}
        self._gkd_serving = self.vllm_config.model_config.dtype
        if sync_mode != "merged":
            self._gkd_pristine: dict[str, torch.Tensor] = {}
            return 0
        self._gkd_pristine = read_pristine(
            self.vllm_config.model_config.model, getattr(torch, pristine_dtype), self.device
        )
        return len(self._gkd_pristine)

    def gkd_apply(self: Any, kind: str, data: bytes, scale: float) -> int:
        """Load pristine + this adapter (kind "lora") or these whole tensors (kind "full"); returns
        how many tensors were reloaded. An empty lora push restores the pristine weights."""
        from safetensors.torch import load

        from rollout_server.weights import read_tensors
        from shared.adapters import lora_pairs, merge_lora

        tensors = load(data) if data else {}
        pristine: dict[str, torch.Tensor] = self._gkd_pristine
        new: dict[str, torch.Tensor] = {}
        if kind == "full":
            new = {name: t.to(device=self.device, dtype=self._gkd_serving) for name, t in tensors.items()}
            self._gkd_full |= set(new)
            touched: set[str] = set()
        else:
            pairs = {w: (a.to(self.device), b.to(self.device)) for w, (a, b) in lora_pairs(tensors).items()}
            new = merge_lora(pristine, pairs, scale, self._gkd_serving)
            touched = set(pairs)
            # A LoRA (or empty) push serves base + adapter: whatever an earlier full push replaced goes
            # back to the base checkpoint's values (from the pristine copy, or read from disk).
            back = self._gkd_full - set(new)
            new |= {n: pristine[n].to(self._gkd_serving) for n in back if n in pristine}
            new |= read_tensors(
                self.vllm_config.model_config.model, back - set(new), self._gkd_serving, self.device
            )
            self._gkd_full = set()
        out = self._gkd_with_siblings(new)
        self.reload_weights(weights_iterator=list(out.items()), is_checkpoint_format=True)
        if any(name.endswith("embed_tokens.weight") for name in out):
            self._gkd_retie_lm_head()
        self._gkd_dirty = touched
        return len(out)

    def _gkd_retie_lm_head(self: Any) -> None:
        """A tied lm_head after its embedding changed (a full push): the reload re-processes only the
        layers it loaded, so on CPU the lm_head's packed GEMM copy of the embedding stayed the old one
        (measured: canary |Δ logprob| 1.6 after a changed embedding). Tie it to the loaded embedding
        again and rebuild its packed copy."""
        model = self.model_runner.model
        lm_head = getattr(model, "lm_head", None)
        embed = getattr(getattr(model, "model", None), "embed_tokens", None)
        text_cfg = self.vllm_config.model_config.hf_config.get_text_config()
        if lm_head is None or embed is None or not getattr(text_cfg, "tie_word_embeddings", False):
            return
        lm_head.weight = embed.weight
        method = getattr(lm_head, "quant_method", None)
        if method is not None and hasattr(method, "process_weights_after_loading"):
            method.process_weights_after_loading(lm_head)

    def _gkd_with_siblings(self: Any, new: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """`new` plus (a) weights a previous adapter touched and this one does not (back to
        pristine) and (b) every part (and bias) of each fused layer touched: vLLM repacks a fused
        layer only once all its parts are loaded."""
        pristine = self._gkd_pristine
        names = set(new) | self._gkd_dirty
        for name in list(names):
            if name.count(".") < 2:
                continue
            prefix, module, _ = name.rsplit(".", 2)
            for part in self._gkd_siblings.get(module, ()):
                sib = f"{prefix}.{part}.weight"
                if sib in pristine:
                    names.add(sib)
        out = {}
        for name in sorted(names):  # sorted = grouped by layer, so vLLM buffers one layer at a time
            out[name] = new[name] if name in new else pristine[name].to(self._gkd_serving)
            bias = name[: -len("weight")] + "bias"
            if name.endswith(".weight") and bias in pristine and bias not in new:
                out[bias] = pristine[bias].to(self._gkd_serving)
        return out
