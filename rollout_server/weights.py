"""Pushed adapters checked against the base model before anything reaches the engine, and the
pristine weights the engine's workers merge into (read by `worker_ext.py` on each worker).

Every check happens here, on the host, from the checkpoint's shapes alone: a reload that fails
halfway leaves vLLM's model half-restored and its next step kills the engine.

Merged mode: each worker computes W' = W + scale * B @ A, always from its pristine W (never from
the last merge), so rounding never accumulates over hundreds of pushes.
LoRA mode: the same validation, then the adapter is written to a fresh directory per version.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING

from shared.adapters import AdapterError, lora_pairs, scale_of, sha256_hex, unpack, validate_pairs
from shared.messages import LoraSpec

if TYPE_CHECKING:
    import torch

# Weights an adapter may never target: embeddings / output head (tied in SmolLM2-like models).
_NOT_ADAPTABLE = ("embed_tokens", "lm_head", "wte", "wpe")
_FLOAT_DTYPES = ("F32", "BF16", "F16")


class ChecksumError(AdapterError):
    """The adapter bytes do not hash to the pushed sha256."""


def _files(model_dir: str) -> list[Path]:
    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(
            f"{model_dir}: no *.safetensors files; the rollout server needs safetensors weights"
        )
    return files


def checkpoint_shapes(model_dir: str) -> dict[str, tuple[tuple[int, ...], str]]:
    """{HF name: (shape, safetensors dtype)} of every tensor, from the file headers (no values)."""
    from safetensors import safe_open

    out = {}
    for f in _files(model_dir):
        with safe_open(str(f), framework="pt") as st:
            for name in st.keys():  # noqa: SIM118 - safe_open is not a dict
                sl = st.get_slice(name)
                out[name] = (tuple(sl.get_shape()), sl.get_dtype())
    return out


def adaptable(shapes: dict[str, tuple[tuple[int, ...], str]]) -> dict[str, tuple[int, ...]]:
    """The 2-D float linear weights an adapter may target, with their shapes."""
    return {
        name: shape
        for name, (shape, dtype) in shapes.items()
        if name.endswith(".weight")
        and len(shape) == 2
        and dtype in _FLOAT_DTYPES
        and not any(part in name for part in _NOT_ADAPTABLE)
    }


def read_pristine(model_dir: str, dtype: torch.dtype, device: torch.device) -> dict[str, torch.Tensor]:
    """The adaptable weights and their biases, as `dtype` on `device` (HF names)."""
    from safetensors import safe_open

    weights = adaptable(checkpoint_shapes(model_dir))
    out = {}
    for f in _files(model_dir):
        with safe_open(str(f), framework="pt") as st:
            for name in st.keys():  # noqa: SIM118 - safe_open is not a dict
                if name in weights or (name.endswith(".bias") and name[: -len("bias")] + "weight" in weights):
                    out[name] = st.get_tensor(name).to(device=device, dtype=dtype)
    return out


def read_tensors(
    model_dir: str, names: set[str], dtype: torch.dtype, device: torch.device
) -> dict[str, torch.Tensor]:
    """These tensors of the model's own checkpoint, as `dtype` on `device` (HF names)."""
    from safetensors import safe_open

    out = {}
    for f in _files(model_dir):
        with safe_open(str(f), framework="pt") as st:
            for name in st.keys():  # noqa: SIM118 - safe_open is not a dict
                if name in names:
                    out[name] = st.get_tensor(name).to(device=device, dtype=dtype)
    return out


class AdapterCheck:
    """All validation of a pushed adapter, against the base model's checkpoint shapes."""

    def __init__(self, model_dir: str):
        self.all = checkpoint_shapes(model_dir)
        self.shapes = adaptable(self.all)

    @staticmethod
    def _checksum(data: bytes, sha256: str) -> None:
        if sha256_hex(data) != sha256.lower():
            raise ChecksumError(
                "adapter bytes do not match the pushed sha256 (corrupted in transit?); push it again"
            )

    def lora(
        self, data: bytes, sha256: str, spec: LoraSpec, max_rank: int
    ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """A LoRA push; returns its {base weight: (A, B)} pairs."""
        import torch

        self._checksum(data, sha256)
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

    def full(self, data: bytes, sha256: str) -> None:
        """A "full" push: whole float tensors under the checkpoint's own names and shapes."""
        import torch

        self._checksum(data, sha256)
        tensors = unpack(data)
        if not tensors:
            raise AdapterError("full push holds no tensors")
        for name, t in tensors.items():
            if name not in self.all:
                raise AdapterError(f"full push holds {name!r}, which the model's checkpoint does not have")
            shape = self.all[name][0]
            if tuple(t.shape) != shape:
                raise AdapterError(f"full push: {name!r} has shape {tuple(t.shape)}; the model's is {shape}")
            if t.dtype not in (torch.float32, torch.bfloat16, torch.float16):
                raise AdapterError(f"full push: {name!r} has dtype {t.dtype}; expected a float dtype")
            if not torch.isfinite(t).all():
                raise AdapterError(f"full push: {name!r} holds NaN or inf values")


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
