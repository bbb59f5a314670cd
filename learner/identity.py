"""Run identity: which run an output_dir and a checkpoint belong to, and what may be resumed.

Every run has an id, made when it starts fresh and kept by every resume. It is written, with the
run's config hash, in `output_dir/config.json` (key "run") and in every checkpoint (`run.json`,
listed in the manifest). The hash covers every setting except those a resume may change: the
resume flags, the step counts (a run is often extended), where the output and the rollout server
are (a preempted run comes back on other machines) and how long to wait for it.

`plan()` decides, before anything is loaded or written, between:

* a fresh run: refused into an output_dir that already holds one, unless --overwrite_output_dir
  (which then clears that run's checkpoints and metrics once the new run has checked out);
* a resume (`--resume latest|PATH`, `--resume_from_checkpoint PATH|true`): only a checkpoint of the
  run in output_dir (or, into an empty output_dir, of the run the checkpoint names), and only with
  the same config hash. Checkpoints of other runs are never picked up by "latest".
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from learner import checkpoint
from learner.errors import UserError
from shared.config import Config, resume_target, to_dict

log = logging.getLogger("gkd.learner")

# Settings a resume may change (section, field): everything else must hash the same.
RESUMABLE = {
    ("train", "resume"),
    ("train", "resume_from_checkpoint"),
    ("train", "overwrite_output_dir"),
    ("train", "max_steps"),
    ("train", "num_train_epochs"),
    ("train", "output_dir"),
    ("rollout", "rollout_url"),
    ("rollout", "transport"),
    ("rollout", "server_host"),
    ("rollout", "server_port"),
    ("rollout", "token"),
    ("rollout", "request_timeout_s"),
    ("rollout", "reconnect_deadline_s"),
    ("rollout", "max_message_mb"),
}

# What a run leaves in output_dir that belongs to the run (cleared by --overwrite_output_dir).
RUN_FILES = ("metrics.jsonl", "samples.jsonl")
RUN_DIRS = ("checkpoints", "runs")


@dataclass
class RunInfo:
    run_id: str
    config_hash: str
    run_name: str
    settings: dict[str, Any]  # the hashed settings, "section.field" -> value

    def to_json(self) -> dict[str, Any]:
        return {"run_id": self.run_id, "config_hash": self.config_hash, "run_name": self.run_name}


@dataclass
class Plan:
    run: RunInfo
    checkpoint: Path | None  # the checkpoint to resume from; None: start at step 0
    clear: bool  # the output_dir holds another run's files, to be removed (overwrite_output_dir)


def hashed_settings(d: dict[str, Any]) -> dict[str, Any]:
    """The settings the config hash covers, "section.field" -> value, from a config dict."""
    return {
        f"{sec}.{k}": v
        for sec, fields in sorted(d.items())
        if isinstance(fields, dict) and sec != "run"
        for k, v in sorted(fields.items())
        if (sec, k) not in RESUMABLE
    }


def config_hash(cfg: Config) -> str:
    blob = json.dumps(hashed_settings(to_dict(cfg)), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def new_run_id() -> str:
    return f"{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{uuid.uuid4().hex[:8]}"


def run_info(cfg: Config, run_id: str) -> RunInfo:
    name = cfg.train.run_name or Path(cfg.train.output_dir).resolve().name
    return RunInfo(run_id, config_hash(cfg), name, hashed_settings(to_dict(cfg)))


def recorded_run(out: Path) -> dict[str, Any] | None:
    """The "run" entry of output_dir/config.json (None: no run recorded, or an unreadable file)."""
    try:
        run = json.loads((out / "config.json").read_text()).get("run")
    except (OSError, ValueError, AttributeError):
        return None
    return run if isinstance(run, dict) and "run_id" in run else None


def holds_run(out: Path) -> bool:
    """Does output_dir hold (part of) a run: its config, metrics or checkpoints?"""
    if (out / "config.json").exists() or (out / "checkpoints").is_dir():
        return True
    m = out / "metrics.jsonl"
    return m.exists() and m.stat().st_size > 0


def plan(cfg: Config) -> Plan:
    """Decide fresh / resume for this config; UserError (one line) when it must be refused."""
    out = Path(cfg.train.output_dir)
    target = resume_target(cfg)
    if target is None:
        used = holds_run(out)
        if used and not cfg.train.overwrite_output_dir:
            raise UserError(
                f"output_dir={str(out)!r} already holds a run{_describe(out)}; continue it with --resume latest, "
                "replace it with --overwrite_output_dir, or choose another --output_dir"
            )
        return Plan(run_info(cfg, new_run_id()), None, clear=used)
    recorded = recorded_run(out)
    if target == "latest":
        return _plan_latest(cfg, out, recorded)
    return _plan_path(cfg, out, Path(target), recorded)


def _plan_latest(cfg: Config, out: Path, recorded: dict[str, Any] | None) -> Plan:
    if recorded is None:
        if any(checkpoint.step_dirs(out)):
            raise UserError(
                f"resume=latest: the checkpoints in {checkpoint.checkpoints_dir(out)} carry no run id "
                f"({out / 'config.json'} names no run), so they cannot be told apart from another run's; "
                "resume one by path with --resume PATH, or start a fresh run with --overwrite_output_dir"
            )
        log.info("resume=latest: %s holds no run yet; starting a new one at step 0", out)
        return Plan(run_info(cfg, new_run_id()), None, clear=False)
    run = run_info(cfg, recorded["run_id"])
    _same_config(run, recorded.get("config_hash"), out / "config.json", _settings_of(out / "config.json"))
    found = checkpoint.find_latest(out, run_id=run.run_id)
    if found is None:
        log.info(
            "resume=latest: run %s has no complete checkpoint in %s; starting it again at step 0",
            run.run_id,
            checkpoint.checkpoints_dir(out),
        )
    return Plan(run, found, clear=False)


def _plan_path(cfg: Config, out: Path, path: Path, recorded: dict[str, Any] | None) -> Plan:
    checkpoint.require_complete(path)
    ck_run = checkpoint.read_run(path)
    if ck_run is None:
        raise UserError(
            f"checkpoint {path} carries no run id (written before runs had ids); it cannot be checked "
            "against this run's config: start a fresh run instead"
        )
    if recorded is not None and recorded["run_id"] != ck_run["run_id"]:
        raise UserError(
            f"checkpoint {path} belongs to run {ck_run['run_id']}, but output_dir={str(out)!r} holds run "
            f"{recorded['run_id']}: resume a checkpoint of that run, or give another --output_dir"
        )
    if recorded is None and holds_run(out):
        raise UserError(
            f"output_dir={str(out)!r} holds files of a run without an id; resume into an empty --output_dir "
            "or the run's own one"
        )
    run = run_info(cfg, ck_run["run_id"])
    _same_config(run, ck_run.get("config_hash"), path, ck_run.get("settings") or {})
    return Plan(run, path, clear=False)


def _same_config(run: RunInfo, recorded_hash: str | None, where: Path, recorded: dict[str, Any]) -> None:
    if recorded_hash == run.config_hash:
        return
    diffs = [
        f"{k.split('.', 1)[1]} {recorded.get(k)!r} -> {run.settings.get(k)!r}"
        for k in sorted(set(recorded) | set(run.settings))
        if recorded.get(k) != run.settings.get(k)
    ]
    what = f" ({', '.join(diffs[:6])}{', ...' if len(diffs) > 6 else ''})" if diffs else ""
    raise UserError(
        f"cannot resume run {run.run_id}: its config hash {recorded_hash} ({where}) differs from this "
        f"command's {run.config_hash}{what}; only the resume and step-count settings may change"
    )


def _settings_of(config_json: Path) -> dict[str, Any]:
    """The hashed settings recorded in a config.json (for naming what differs)."""
    try:
        return hashed_settings(json.loads(config_json.read_text()))
    except (OSError, ValueError, AttributeError):
        return {}


def _describe(out: Path) -> str:
    run = recorded_run(out)
    latest = checkpoint.find_latest(out, run_id=run["run_id"] if run else None, quiet=True)
    parts = [f"run {run['run_id']}"] if run else []
    if latest is not None:
        parts.append(f"checkpoint {latest.name}")
    return f" ({', '.join(parts)})" if parts else ""


def clear_run(out: Path) -> None:
    """Remove the previous run's own files (only those gkd-service writes) from output_dir."""
    for name in RUN_FILES:
        (out / name).unlink(missing_ok=True)
    for name in RUN_DIRS:
        shutil.rmtree(out / name, ignore_errors=True)
    log.info("overwrite_output_dir: removed the previous run's checkpoints and metrics from %s", out)
