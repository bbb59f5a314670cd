"""`python -m deploy.ray_job`: the whole service as one Ray job.

    ray job submit --working-dir . -- python -m deploy.ray_job --config run.yaml --rollout_num_gpus 1

Takes the same flags and config file as `gkd-learner`, plus the resources of each side. It places
the rollout server as a named Ray actor (vLLM inside, its own CPUs/GPUs), waits until its engine
answers, then runs the learner as a Ray task with its own resources; the two talk over the Ray
transport (`ray://<actor name>`), so rollouts and adapters move through the object store.

Failures never hang the job: the engine start is bounded by --ready_timeout_s, every learner call
by --request_timeout_s, and a dead actor fails the waiting side at once. The remote traceback goes
to the job's logs, then one line `deploy.ray_job: error: ...` and exit code 2. The rollout actor
belongs to this driver, so it dies with the job either way.

Only the standard library and msgspec are imported before the flags are parsed.
"""

from __future__ import annotations

import os
import secrets
import sys
from typing import Any

import msgspec

from shared.config import Config, ConfigError, exit_on_config_error, parse_args
from shared.trl_flags import warning_line

PROG = "deploy.ray_job"

EXTRA: list[tuple[str, dict[str, Any]]] = [
    (
        "--rollout_num_cpus",
        dict(type=float, default=1.0, help="CPUs reserved for the rollout actor (default 1)."),
    ),
    (
        "--rollout_num_gpus",
        dict(type=float, default=0.0, help="GPUs for the rollout actor; 0 runs vLLM on CPU (default 0)."),
    ),
    (
        "--learner_num_cpus",
        dict(type=float, default=1.0, help="CPUs reserved for the learner task (default 1)."),
    ),
    ("--learner_num_gpus", dict(type=float, default=0.0, help="GPUs for the learner task (default 0).")),
    ("--actor_name", dict(default=None, help="Name of the rollout actor (default: gkd-rollout-<random>).")),
    (
        "--ready_timeout_s",
        dict(type=float, default=900.0, help="Seconds to wait for the rollout engine to start."),
    ),
]


# Settings the job decides itself: the model and token are the learner's; the actor serves no
# ZeroMQ or HTTP port; it is the student.
JOB_OWNED = ("model", "token", "host", "port", "http_port", "role")
# Defaults taken from the learner's config instead of the server's own (shown in --help).
DERIVED = {
    "max_model_len": "default: the learner's max_length",
    "max_lora_rank": "default: max(64, lora_r)",
    "seed": "default: the learner's seed",
    "trust_remote_code": "default: the learner's trust_remote_code",
}


def server_flags() -> list[tuple[str, dict[str, Any]]]:
    """Every other setting of the rollout server, as --server_<name> (same names as gkd-rollout-server)."""
    from rollout_server.settings import flag_specs

    return [(flags[0], kw) for flags, kw in flag_specs("server_", skip=JOB_OWNED, shown=DERIVED)]


class JobFailed(RuntimeError):
    """One side failed; the message is the one line for the job's logs."""


def main(argv: list[str] | None = None) -> int:
    try:
        cfg, ns = parse_args(
            argv, prog=PROG, description=__doc__.split("\n\n")[0], extra=EXTRA + server_flags()
        )
        errs = _check_resources(cfg, ns)
        if errs:
            raise ConfigError(errs)
        # A per-job secret when none is given: the actor's name is visible to every driver on the cluster.
        settings = server_settings(cfg, ns, cfg.rollout.token or secrets.token_urlsafe(24))
    except ConfigError as e:
        exit_on_config_error(PROG, e)
    if ns.trl_no_effect:  # one line, as gkd-learner says it
        sys.stderr.write(f"{PROG}: warning: {warning_line(ns.trl_no_effect)}\n")
    import ray

    ray.init()  # inside `ray job submit` this joins the job's cluster; alone it starts a local one
    try:
        run(cfg, ns, settings)
    except JobFailed as e:
        sys.stderr.write(f"{PROG}: error: {e}\n")
        return 2
    finally:
        ray.shutdown()
    return 0


def run(cfg: Config, ns: Any, settings: Any) -> None:
    """Start the rollout actor, wait for it, run the learner to completion (or raise JobFailed)."""
    import ray

    from rollout_server.ray_actor import start_rollout_actor
    from shared.transport.ray_transport import RayClient

    token = settings.token
    name = ns.actor_name or f"gkd-rollout-{secrets.token_hex(4)}"
    actor = start_rollout_actor(settings, name, ns.rollout_num_cpus, ns.rollout_num_gpus)
    learner_ref = None
    try:
        _wait_ready(RayClient(name, token=token), name, ns.ready_timeout_s)
        cfg.rollout.rollout_url, cfg.rollout.transport, cfg.rollout.token = f"ray://{name}", "ray", token
        task = ray.remote(_learner_task).options(
            num_cpus=ns.learner_num_cpus,
            num_gpus=ns.learner_num_gpus,
            max_retries=0,  # a retry would restart training from scratch against a moved-on server
            runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false"}},
        )
        learner_ref = task.remote(msgspec.msgpack.encode(cfg))
        print(f"{PROG}: learner started against ray://{name}", flush=True)
        out = _get(learner_ref, "learner")
        print(f"{PROG}: learner finished: {out}", flush=True)
    finally:
        if learner_ref is not None:
            ray.cancel(learner_ref, force=True)  # no-op when it finished
        ray.kill(actor, no_restart=True)


def server_settings(cfg: Config, ns: Any, token: str):
    """The rollout server's settings: the learner's config where the job owns or derives a setting,
    then every --server_<name> flag given (ConfigError if they cannot work)."""
    import msgspec

    from rollout_server.settings import ServerSettings, problems

    given = {
        k.removeprefix("server_"): v for k, v in vars(ns).items() if k.startswith("server_") and v is not None
    }
    derived = {
        "model": cfg.model.model_name_or_path,
        "token": token,
        "max_model_len": cfg.data.max_length,
        "max_lora_rank": max(64, cfg.lora.lora_r),
        "seed": cfg.train.seed,
        "trust_remote_code": cfg.model.trust_remote_code,
    }
    try:
        settings = msgspec.convert({**derived, **given}, ServerSettings)
    except msgspec.ValidationError as e:
        raise ConfigError([f"invalid server setting: {e}"]) from None
    errs = [e.replace("--", "--server_", 1) for e in problems(settings)]
    if settings.max_lora_rank < cfg.lora.lora_r:
        errs.append(
            f"server_max_lora_rank={settings.max_lora_rank} is invalid: must be >= lora_r={cfg.lora.lora_r}"
        )
    if errs:
        raise ConfigError(errs)
    return settings


def _check_resources(cfg: Config, ns: Any) -> list[str]:
    errs = []
    for flag in ("rollout_num_cpus", "rollout_num_gpus", "learner_num_cpus", "learner_num_gpus"):
        if getattr(ns, flag) < 0:
            errs.append(f"{flag}={getattr(ns, flag)!r} is invalid: must be >= 0")
    if ns.ready_timeout_s <= 0:
        errs.append(f"ready_timeout_s={ns.ready_timeout_s!r} is invalid: must be > 0")
    if cfg.rollout.rollout_url is not None or cfg.rollout.transport not in ("auto", "ray"):
        errs.append(
            "rollout_url/transport are set by deploy.ray_job (ray://<actor_name>); leave them out, or use --actor_name"
        )
    if not os.path.isabs(os.path.expanduser(cfg.train.output_dir)):
        # The job's working directory is a temporary copy that Ray deletes afterwards.
        errs.append(
            f"output_dir={cfg.train.output_dir!r} is invalid: must be an absolute path (on a shared filesystem for multi-node clusters)"
        )
    return errs


def _wait_ready(client: Any, name: str, timeout_s: float) -> None:
    """Block until the engine answers a status request; its __init__ may take minutes."""
    from shared.transport.base import RemoteError, ServerUnavailable

    try:
        st = client.status(timeout_s=timeout_s)
    except (ServerUnavailable, RemoteError) as e:
        _print_cause(e.__cause__)
        raise JobFailed(f"rollout server {name!r} did not start: {e}") from None
    finally:
        client.close()
    if not st.healthy:
        raise JobFailed(f"rollout server {name!r} started unhealthy: {st}")
    print(f"{PROG}: rollout server {name!r} ready (model {st.model}, {st.dtype}, {st.sync_mode})", flush=True)


def _get(ref: Any, what: str) -> Any:
    import ray

    from shared.transport.ray_transport import cause_line

    try:
        return ray.get(ref)
    except ray.exceptions.RayError as e:
        _print_cause(e)
        raise JobFailed(f"{what} failed: {cause_line(e)}") from None


def _learner_task(cfg_msgpack: bytes) -> str:
    """Runs on a Ray worker: the learner recipe, against the actor named in rollout_url.

    Config in and figures out travel as msgpack/JSON text, never as pickled objects of ours."""
    from learner.recipe import run as run_learner

    cfg = msgspec.msgpack.decode(cfg_msgpack, type=Config)
    figures = run_learner(cfg)
    return msgspec.json.encode({"output_dir": cfg.train.output_dir, **(figures or {})}).decode()


def _print_cause(e: BaseException | None) -> None:
    # The remote traceback, for the job's logs; the one-line summary follows it.
    if e is not None:
        sys.stderr.write(f"{e}\n")


if __name__ == "__main__":
    sys.exit(main())
