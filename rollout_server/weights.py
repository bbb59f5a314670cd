"""The pristine base weights and the turn from a pushed adapter into tensors the engine can load.

Every check happens here, before the engine is touched: a reload that fails halfway leaves vLLM's
model half-restored and the next generate kills the engine.

Merged mode: W' = W + scale * B @ A, always from the pristine fp32 W (never from the last merge), so
rounding never accumulates over hundreds of pushes; the result is cast to the serving dtype.
LoRA mode: the same validation, then the adapter is written to a fresh directory per version.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING

from shared.adapters import AdapterError, lora_pairs, merge_lora, scale_of, sha256_hex, unpack, validate_pairs
from shared.messages import LoraSpec

if TYPE_CHECKING:
    import torch

# Weights an adapter may never target: embeddings / output head (tied in SmolLM2-like models).
_NOT_ADAPTABLE = ("embed_tokens", "lm_head", "wte", "wpe")


class ChecksumError(AdapterError):
    """The adapter bytes do not hash to the pushed sha256."""


def load_base(model_dir: str) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Read the linear weights (fp32, HF names) and their biases from the model's safetensors."""
    import torch
    from safetensors import safe_open

    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(
            f"{model_dir}: no *.safetensors files; the rollout server needs safetensors weights"
        )
    weights: dict[str, torch.Tensor] = {}
    biases: dict[str, torch.Tensor] = {}
    for f in files:
        with safe_open(str(f), framework="pt") as st:
            for name in st.keys():  # noqa: SIM118 - safe_open is not a dict
                if any(part in name for part in _NOT_ADAPTABLE) or not name.endswith((".weight", ".bias")):
                    continue
                t = st.get_tensor(name)
                if name.endswith(".weight") and t.dim() == 2 and t.is_floating_point():
                    weights[name] = t.to(torch.float32)
                elif name.endswith(".bias") and t.dim() == 1:
                    biases[name] = t
    return weights, {k: v for k, v in biases.items() if k[: -len("bias")] + "weight" in weights}


class BaseWeights:
    """The pristine copy of everything an adapter can touch, and what the engine currently holds."""

    def __init__(
        self,
        model_dir: str,
        serving_dtype: torch.dtype,
        packed_modules: dict[str, list[str]],
        keep_values: bool = True,
    ):
        self.pristine, self._biases = load_base(model_dir)
        self.shapes = {k: tuple(v.shape) for k, v in self.pristine.items()}
        if not keep_values:  # lora mode validates shapes only; don't hold a second copy of the model
            self.pristine, self._biases = {}, {}
        self.dtype = serving_dtype
        # sub-module name -> all parts of the fused vLLM layer it belongs to (q_proj -> q, k, v).
        self._siblings = {part: parts for parts in packed_modules.values() for part in parts}
        self._dirty: set[str] = set()  # weights the engine holds merged (not pristine) right now

    def check(
        self, data: bytes, sha256: str, spec: LoraSpec, max_rank: int
    ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """All validation of a pushed adapter; returns its {base weight: (A, B)} pairs."""
        import torch

        if sha256_hex(data) != sha256.lower():
            raise ChecksumError(
                "adapter bytes do not match the pushed sha256 (corrupted in transit?); push it again"
            )
        pairs = lora_pairs(unpack(data))
        validate_pairs(pairs, self.shapes, spec, max_rank)
        if not set(spec.target_modules) & {"all-linear", "all_linear"}:
            for weight in pairs:
                module = weight[: -len(".weight")]
                # PEFT's rule: a target matches the full module name or its last dotted parts.
                if not any(module == t or module.endswith("." + t) for t in spec.target_modules):
                    raise AdapterError(
                        f"adapter holds {weight!r} but lora.target_modules={spec.target_modules} does not cover it"
                    )
        if not math.isfinite(scale_of(spec)):
            raise AdapterError(f"lora_alpha={spec.lora_alpha}, r={spec.r} give a non-finite scale")
        for weight, (a, b) in pairs.items():
            if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
                raise AdapterError(f"adapter for {weight!r} holds NaN or inf values")
        return pairs

    def merged(
        self, pairs: dict[str, tuple[torch.Tensor, torch.Tensor]], spec: LoraSpec
    ) -> dict[str, torch.Tensor]:
        """The tensors to load so that the engine holds exactly pristine + this adapter.

        Besides the merged targets this includes (a) weights a previous adapter touched and this
        one does not (back to pristine) and (b) every part (and bias) of each fused layer touched.
        """
        new = merge_lora(self.pristine, pairs, scale_of(spec), self.dtype)
        names = set(new) | self._dirty
        for name in list(names):
            prefix, module = name.rsplit(".", 2)[0], name.rsplit(".", 2)[1]
            for part in self._siblings.get(module, ()):
                sib = f"{prefix}.{part}.weight"
                if sib in self.pristine:
                    names.add(sib)
        out = {}
        for name in sorted(names):  # sorted = grouped by layer, so vLLM buffers one layer at a time
            out[name] = new[name] if name in new else self.pristine[name].to(self.dtype)
            bias = name[: -len("weight")] + "bias"
            if bias in self._biases:
                out[bias] = self._biases[bias].to(self.dtype)
        return out

    def committed(self, pairs: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Record what the engine holds after a successful load."""
        self._dirty = set(pairs)


def write_adapter_dir(root: Path, version: int, data: bytes, spec: LoraSpec) -> Path:
    """A PEFT adapter directory unique to `version` (vLLM caches by name and path)."""
    d = root / f"v{version:08d}"
    d.mkdir(parents=True, exist_ok=False)
    (d / "adapter_model.safetensors").write_bytes(data)
    cfg = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": spec.r,
        "lora_alpha": spec.lora_alpha,
        "target_modules": spec.target_modules,
        "use_rslora": spec.use_rslora,
        "lora_dropout": 0.0,
        "bias": "none",
        "modules_to_save": None,
        "fan_in_fan_out": False,
    }
    (d / "adapter_config.json").write_text(json.dumps(cfg))
    return d
