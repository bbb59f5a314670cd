"""Metrics sinks: `output_dir/metrics.jsonl` (one JSON object per logged step) and TensorBoard.

Rows: training rows carry `loss` (plus policy_version, lr, on_policy_fraction, staleness,
seconds_per_step, tokens_per_s, ...); evaluation rows carry `eval/...` figures; a few event rows
carry `event` ("start": data counts such as overlong_prompts; "reconnect": a server outage;
"replica_lost" / "replica_rejoined": one of several rollout replicas dropped out or came back).
With several replicas, training rows also carry `replicas`: per replica its state, policy_version,
queue_depth, tokens_per_s, outstanding sequences and replies served.

On resume, lines of the interrupted run past the checkpoint's step are dropped first, so the file
reads as one run: every step at most once, in order. A torn line (a write cut off by a full disk
or a kill) is dropped too, with a warning.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any

log = logging.getLogger("gkd.learner")


class MetricsLog:
    def __init__(
        self,
        output_dir: str | Path,
        *,
        resume_step: int | None,
        enabled: bool = True,
        tensorboard: bool = True,
        tensorboard_dir: str | Path | None = None,
        sinks: Any = None,
    ):
        """tensorboard: write TensorBoard events to tensorboard_dir (default output_dir/runs);
        sinks: more reporters (an object with log(step, values) and close(), e.g. wandb's)."""
        self.enabled = enabled
        self.path = Path(output_dir) / "metrics.jsonl"
        self._tb = None
        self._sinks = sinks
        if not enabled:
            return
        if resume_step is None:
            self.path.write_text("")
        else:
            self._trim(resume_step)
        if not tensorboard:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(tensorboard_dir or Path(output_dir) / "runs"))
        except ImportError as e:  # tensorboard is optional at runtime; the jsonl is the record
            log.warning("TensorBoard logging off (%s); metrics.jsonl still written", e)

    def _trim(self, step: int) -> None:
        if not self.path.exists():
            return
        keep = []
        for n, line in enumerate(self.path.read_text(errors="replace").splitlines(), 1):
            row = _parse(line)
            if row is None and line.strip():
                log.warning("metrics.jsonl line %d is torn (%r...): dropped", n, line[:40])
            elif row is not None and row.get("step", 0) <= step:
                keep.append(line)
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(line + "\n" for line in keep))
        os.replace(tmp, self.path)

    def log(self, step: int, values: dict[str, Any]) -> None:
        if not self.enabled:
            return
        row = {"step": step, **{k: _clean(v) for k, v in values.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self._tb is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
                    self._tb.add_scalar(k if "/" in k else f"train/{k}", v, step)
            self._tb.flush()
        if self._sinks is not None:
            self._sinks.log(step, row)

    def close(self) -> None:
        if self._sinks is not None:
            self._sinks.close()
            self._sinks = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def _clean(v: Any) -> Any:
    """JSON has no NaN/inf: write them as null."""
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def _parse(line: str) -> dict[str, Any] | None:
    try:
        row = json.loads(line)
    except ValueError:
        return None
    return row if isinstance(row, dict) else None


def read(output_dir: str | Path) -> list[dict[str, Any]]:
    """The rows of metrics.jsonl; torn lines are skipped."""
    path = Path(output_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [r for r in map(_parse, path.read_text(errors="replace").splitlines()) if r is not None]
