"""LoRA adapters on the wire and the merge both sides agree on.

The learner packs its PEFT adapter as safetensors bytes; the server checks and merges it into a
pristine fp32 copy of its base weights. Both use `merge_lora` so that "the HF model with the adapter
merged" and "what the server serves" are the same function of the same numbers.

Torch is imported lazily: this module is imported by thin entry points.
"""

from __future__ import annotations

import hashlib
import re
from typing import TYPE_CHECKING

from shared.messages import LoraSpec

if TYPE_CHECKING:
    import torch

# PEFT saves "base_model.model.<module>.lora_A.weight" (the adapter name is stripped on save).
_PEFT_RE = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.[^.]+)?\.weight$")


class AdapterError(ValueError):
    """An adapter that does not fit the model; the message says which tensor and why."""


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def pack(tensors: dict[str, torch.Tensor]) -> bytes:
    """Serialize adapter tensors to safetensors bytes (contiguous, CPU)."""
    from safetensors.torch import save

    return save({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()})


def unpack(data: bytes) -> dict[str, torch.Tensor]:
    """Parse safetensors bytes. safetensors never executes code, unlike pickle."""
    from safetensors.torch import load

    try:
        return load(data)
    except Exception as e:  # noqa: BLE001 - the library raises several types for corrupt input
        raise AdapterError(f"adapter is not valid safetensors: {e}") from None


def lora_pairs(tensors: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Group PEFT tensor names into {base weight name: (A [r, in], B [out, r])}."""
    halves: dict[str, dict[str, torch.Tensor]] = {}
    for name, t in tensors.items():
        m = _PEFT_RE.match(name)
        if not m:
            raise AdapterError(f"adapter tensor {name!r} is not a LoRA A/B weight")
        halves.setdefault(m["module"] + ".weight", {})[m["ab"]] = t
    out = {}
    for weight, ab in halves.items():
        if set(ab) != {"A", "B"}:
            raise AdapterError(f"adapter for {weight!r} lacks lora_{'B' if 'A' in ab else 'A'}")
        out[weight] = (ab["A"], ab["B"])
    return out


def scale_of(spec: LoraSpec) -> float:
    return spec.lora_alpha / (spec.r**0.5 if spec.use_rslora else spec.r)


def validate_pairs(
    pairs: dict[str, tuple[torch.Tensor, torch.Tensor]],
    base_shapes: dict[str, tuple[int, ...]],
    spec: LoraSpec,
    max_rank: int,
) -> None:
    """Check names, shapes, dtypes and rank against the model before anything is touched."""
    import torch

    if spec.r > max_rank:
        raise AdapterError(
            f"adapter rank r={spec.r} exceeds the server's max_lora_rank={max_rank}; restart the server with a larger --max_lora_rank"
        )
    if not pairs:
        raise AdapterError("adapter holds no LoRA tensors")
    for weight, (a, b) in pairs.items():
        if weight not in base_shapes:
            raise AdapterError(f"adapter targets {weight!r}, which the model does not have")
        out_f, in_f = base_shapes[weight]
        if a.dtype not in (torch.float32, torch.bfloat16, torch.float16) or b.dtype != a.dtype:
            raise AdapterError(
                f"adapter for {weight!r} has dtype {a.dtype}/{b.dtype}; expected a float dtype"
            )
        if tuple(a.shape) != (spec.r, in_f) or tuple(b.shape) != (out_f, spec.r):
            raise AdapterError(
                f"adapter for {weight!r} has shapes A{tuple(a.shape)} B{tuple(b.shape)}; "
                f"expected A{(spec.r, in_f)} B{(out_f, spec.r)} for r={spec.r}"
            )


def merge_lora(
    base: dict[str, torch.Tensor],
    pairs: dict[str, tuple[torch.Tensor, torch.Tensor]],
    scale: float,
    out_dtype: torch.dtype,
) -> dict[str, torch.Tensor]:
    """W' = W + scale * B @ A for each targeted weight, computed in fp32 from the pristine W.

    Always starting from the pristine base (never from the last merge) keeps rounding from
    accumulating over hundreds of pushes.
    """
    import torch

    merged = {}
    for weight, (a, b) in pairs.items():
        w = base[weight].to(torch.float32)
        merged[weight] = torch.addmm(w, b.to(torch.float32), a.to(torch.float32), alpha=scale).to(out_dtype)
    return merged
