"""Resumable checkpoints, written atomically: a half-written checkpoint is never picked up.

`output_dir/checkpoints/step-N/` holds the adapter, optimizer and scheduler states, the RNG states
(python, numpy, torch), and `state.json` (step, policy version, data cursor). Everything is written
into a temporary directory first, fsynced, listed with its sha256 in `manifest.json` (written last),
and then renamed into place. `find_latest` takes the newest directory whose manifest verifies.

Optimizer and scheduler states go through torch.save: they are only ever read back from this local
disk (never from the network) and are loaded with weights_only=True.
"""

from __future__ import annotations

import io
import json
import logging
import os
import random
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file
from safetensors.torch import save as save_safetensors

from learner.data import Cursor
from learner.errors import UserError
from shared.files import sha256_file

log = logging.getLogger("gkd.learner")

MANIFEST = "manifest.json"
FORMAT = 1


@dataclass
class TrainState:
    step: int  # optimizer steps completed
    policy_version: int  # version the server serves after this step's sync
    cursor: Cursor  # data cursor after the last consumed micro-batch
    micro_batches: int  # micro-batches this rank consumed so far (the next draw's local index)
    world_size: int = 1  # ranks that wrote it; resuming with another world size changes the data split

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> TrainState:
        return cls(**{**d, "cursor": Cursor(**d["cursor"])})


def checkpoints_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def save(
    output_dir: str | Path,
    state: TrainState,
    adapter: dict[str, torch.Tensor],
    optimizer: dict,
    scheduler: dict,
) -> Path:
    """Write checkpoint step-<state.step> atomically; raise UserError if the disk refuses."""
    root = checkpoints_dir(output_dir)
    final = root / f"step-{state.step}"
    tmp = root / f".tmp-step-{state.step}-{os.getpid()}"
    try:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        # Serialised in memory, written by plain file writes: a full disk or a file-size limit then
        # surfaces as OSError (ENOSPC, EFBIG) instead of safetensors/torch.save's opaque errors.
        _write_bytes(tmp / "adapter_model.safetensors", save_safetensors(adapter))
        _write_bytes(tmp / "optimizer.pt", _torch_bytes(optimizer))
        _write_bytes(tmp / "scheduler.pt", _torch_bytes(scheduler))
        _write_rng(tmp)
        (tmp / "state.json").write_text(json.dumps(state.to_json(), indent=2))
        files = sorted(p.name for p in tmp.iterdir())
        for name in files:
            _fsync(tmp / name)
        manifest = {"format": FORMAT, "step": state.step, "files": {n: sha256_file(tmp / n) for n in files}}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
        _fsync(tmp / MANIFEST)
        _fsync(tmp)
        if final.exists():  # re-saving the same step (e.g. after a resume): move the old one aside first
            old = root / f".old-step-{state.step}-{os.getpid()}"
            final.rename(old)
            tmp.rename(final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(final)
        _fsync(root)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise UserError(
            f"cannot write checkpoint {final}: {e.strerror or e}; earlier checkpoints are intact"
        ) from None
    return final


def verify(path: str | Path) -> bool:
    """True when the manifest exists and every listed file has its recorded sha256."""
    path = Path(path)
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        files = manifest["files"]
        return (
            manifest.get("format") == FORMAT
            and bool(files)
            and all(sha256_file(path / n) == h for n, h in files.items())
        )
    except (OSError, ValueError, KeyError, TypeError):
        return False


def find_latest(output_dir: str | Path) -> Path | None:
    """The newest checkpoint whose manifest verifies; temporary and broken ones are skipped."""
    root = checkpoints_dir(output_dir)
    if not root.is_dir():
        return None
    steps = []
    for p in root.iterdir():
        if p.is_dir() and p.name.startswith("step-") and p.name[5:].isdigit():
            steps.append((int(p.name[5:]), p))
    for _, p in sorted(steps, reverse=True):
        if verify(p):
            return p
        log.warning("ignoring checkpoint %s: its manifest does not verify (incomplete or corrupt)", p)
    return None


def resolve(resume: str, output_dir: str | Path) -> Path | None:
    """Turn --resume (latest | path) into a verified checkpoint directory (None: start fresh)."""
    if resume == "latest":
        found = find_latest(output_dir)
        if found is None:
            log.info(
                "resume=latest: no complete checkpoint in %s; starting from step 0",
                checkpoints_dir(output_dir),
            )
        return found
    path = Path(resume)
    if not verify(path):
        raise UserError(
            f"resume={resume!r} is not a complete checkpoint (missing or mismatching manifest.json)"
        )
    return path


def load(path: str | Path) -> dict[str, Any]:
    """Read a verified checkpoint: state, adapter tensors, optimizer/scheduler state, rng."""
    path = Path(path)
    return {
        "state": TrainState.from_json(json.loads((path / "state.json").read_text())),
        "adapter": load_file(str(path / "adapter_model.safetensors")),
        "optimizer": torch.load(path / "optimizer.pt", weights_only=True),
        "scheduler": torch.load(path / "scheduler.pt", weights_only=True),
        "rng_python": json.loads((path / "rng.json").read_text()),
        "rng_torch": load_file(str(path / "rng_torch.safetensors")),
    }


def restore_rng(ckpt: dict[str, Any]) -> None:
    py = ckpt["rng_python"]
    random.setstate((py["python"][0], tuple(py["python"][1]), py["python"][2]))
    np_state = py["numpy"]
    np.random.set_state((np_state[0], np.array(np_state[1], dtype=np.uint32), *np_state[2:]))
    t = ckpt["rng_torch"]
    torch.set_rng_state(t["cpu"])
    if torch.cuda.is_available():
        cuda = [t[k] for k in sorted(k for k in t if k.startswith("cuda"))]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)


def _write_rng(d: Path) -> None:
    v, state, gauss = random.getstate()
    np_state = np.random.get_state()
    rng = {
        "python": [v, list(state), gauss],
        "numpy": [
            np_state[0],
            np_state[1].tolist(),
            *[x.item() if hasattr(x, "item") else x for x in np_state[2:]],
        ],
    }
    (d / "rng.json").write_text(json.dumps(rng))
    tensors = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors.update({f"cuda{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    _write_bytes(d / "rng_torch.safetensors", save_safetensors(tensors))


def _torch_bytes(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _write_bytes(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
