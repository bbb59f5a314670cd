"""Resumable checkpoints, written atomically: a half-written checkpoint is never picked up.

`output_dir/checkpoints/step-N/` holds the adapter, optimizer and scheduler states, the RNG states
(python, numpy, torch), `state.json` (step, policy version, data cursor) and `run.json` (the run's
id, config hash and hashed settings: learner.identity). Everything is written into a temporary
directory first, fsynced, listed with its sha256 in `manifest.json` (written last, with the run id),
and then renamed into place. `find_latest` takes the newest directory of the run whose manifest
verifies; `prune` keeps the newest N of them (--save_total_limit).

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
RUN = "run.json"
FORMAT = 1


@dataclass
class TrainState:
    step: int  # optimizer steps completed
    policy_version: int  # version the server serves after this step's sync
    cursor: Cursor  # data cursor after the last consumed micro-batch
    micro_batches: int  # micro-batches this rank consumed so far (the next draw's local index)
    world_size: int = 1  # ranks that wrote it; resuming with another world size changes the data split
    pushed_sha: str = ""  # sha256 of the adapter last pushed (as policy_version); "" if unknown

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
    run: dict[str, Any] | None = None,
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
        if run is not None:
            (tmp / RUN).write_text(json.dumps(run, indent=2, sort_keys=True))
        files = sorted(p.name for p in tmp.iterdir())
        for name in files:
            _fsync(tmp / name)
        manifest = {"format": FORMAT, "step": state.step, "files": {n: sha256_file(tmp / n) for n in files}}
        if run is not None:
            manifest["run_id"] = run["run_id"]
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


def require_complete(path: str | Path) -> Path:
    """`path` itself as a checkpoint to resume: UserError unless its manifest verifies."""
    if not verify(path):
        raise UserError(
            f"resume={str(path)!r} is not a complete checkpoint (missing or mismatching manifest.json)"
        )
    return Path(path)


def step_dirs(output_dir: str | Path) -> list[Path]:
    """The step-N directories, newest first (complete or not; temporary ones excluded)."""
    root = checkpoints_dir(output_dir)
    if not root.is_dir():
        return []
    steps = [
        (int(p.name[5:]), p)
        for p in root.iterdir()
        if p.is_dir() and p.name.startswith("step-") and p.name[5:].isdigit()
    ]
    return [p for _, p in sorted(steps, reverse=True)]


def run_id_of(path: Path) -> str | None:
    try:
        return json.loads((path / MANIFEST).read_text()).get("run_id")
    except (OSError, ValueError, AttributeError):
        return None


def read_run(path: Path) -> dict[str, Any] | None:
    """The checkpoint's run.json (id, config hash, settings); None when it has none."""
    try:
        run = json.loads((path / RUN).read_text())
    except (OSError, ValueError):
        return None
    return run if isinstance(run, dict) and "run_id" in run else None


def find_latest(output_dir: str | Path, run_id: str | None = None, quiet: bool = False) -> Path | None:
    """The newest checkpoint whose manifest verifies (of run `run_id` when given)."""
    for p in step_dirs(output_dir):
        if complete_one(p, run_id, quiet):
            return p
    return None


def complete_one(p: Path, run_id: str | None, quiet: bool) -> bool:
    if not verify(p):
        if not quiet:
            log.warning("ignoring checkpoint %s: its manifest does not verify (incomplete or corrupt)", p)
        return False
    if run_id is not None and run_id_of(p) != run_id:
        if not quiet:
            log.warning("ignoring checkpoint %s: it belongs to run %s, not %s", p, run_id_of(p), run_id)
        return False
    return True


def prune(output_dir: str | Path, keep: int, run_id: str | None) -> list[Path]:
    """Keep the newest `keep` complete checkpoints of the run; remove every older step directory."""
    dirs = step_dirs(output_dir)
    kept = 0
    removed = []
    for i, p in enumerate(dirs):
        if complete_one(p, run_id, quiet=True):
            kept += 1
            if kept == keep:
                removed = dirs[i + 1 :]
                break
    for p in removed:
        shutil.rmtree(p, ignore_errors=True)
    return removed


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
