"""`python -m deploy.ray_job`: the whole service as one Ray job.

    ray job submit --working-dir . -- python -m deploy.ray_job --config run.yaml --rollout_num_gpus 1

Takes the same flags and config file as `gkd-learner`, plus the resources of each side. It places
`--rollout_replicas` rollout servers as named Ray actors (vLLM inside, its own CPUs/GPUs, one
bundle each of a placement group: deploy.ray_plan), waits until their engines answer, then runs the
learner against all of them (`--rollout_url ray://<name0>,ray://<name1>,...`, a replica set): as one
Ray task, or with `--learner_workers G` > 1 on G Ray Train workers (TorchTrainer; torch.distributed
with NCCL on GPUs, gloo on CPU; rank 0 pushes, the data is split across ranks as under torchrun).
The two sides talk over the Ray transport, so rollouts and adapters move through the object store;
a push is put there once and the same object goes to every replica.

Failures never hang the job: the engine start is bounded by --ready_timeout_s, every learner call
by --request_timeout_s, and a dead actor fails the waiting side at once (a lost replica among several
is routed around, as a replica set does). A failed learner worker fails the whole run (Ray Train,
no retries). The remote traceback goes to the job's logs, then one line `deploy.ray_job: error: ...`
and exit code 2. The rollout actors belong to this driver, so they die with the job either way.

Only the standard library and msgspec are imported before the flags are parsed.
"""

from __future__ import annotations

import os
import secrets
import sys
from typing import Any

import msgspec

from deploy.ray_plan import STRATEGIES, Plan, make_plan, problems, shortfall
from shared.config import Config, ConfigError, exit_on_config_error, parse_args
from shared.trl_flags import warning_line

PROG = "deploy.ray_job"

EXTRA: list[tuple[str, dict[str, Any]]] = [
    (
        "--rollout_num_cpus",
        dict(type=float, default=1.0, help="CPUs reserved for each rollout actor (default 1)."),
    ),
    (
        "--rollout_num_gpus",
        dict(type=float, default=0.0, help="GPUs for each rollout actor; 0 runs vLLM on CPU (default 0)."),
    ),
    (
        "--learner_num_cpus",
        dict(type=float, default=1.0, help="CPUs reserved for each learner worker (default 1)."),
    ),
    ("--learner_num_gpus", dict(type=float, default=0.0, help="GPUs for each learner worker (default 0).")),
    (
        "--actor_name",
        dict(
            default=None,
            help="Name of the rollout actor (default: gkd-rollout-<random>); several replicas are <name>-0, <name>-1, ...",
        ),
    ),
    (
        "--rollout_replicas",
        dict(type=int, default=1, help="Rollout actors (vLLM engines) behind the learner (default 1)."),
    ),
    (
        "--learner_workers",
        dict(
            type=int,
            default=1,
            help="Learner workers; more than 1 run under Ray Train's TorchTrainer with torch.distributed (default 1).",
        ),
    ),
    (
        "--placement_strategy",
        dict(
            default="PACK",
            choices=STRATEGIES,
            help="Ray placement strategy of the replicas' and the learner workers' bundles (default PACK).",
        ),
    ),
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
        # A per-job secret when none is given: the actor's name is visible to every driver on the cluster.
        settings = server_settings(cfg, ns, cfg.rollout.token or secrets.token_urlsafe(24))
        errs = _check_resources(cfg, ns, settings.tensor_parallel_size)
        if errs:
            raise ConfigError(errs)
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
    """Place the rollout actors, wait for them, run the learner to completion (or raise JobFailed)."""
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    from rollout_server.ray_actor import start_rollout_actor
    from shared.transport.ray_transport import RayClient

    token = settings.token
    plan = make_plan(ns, ns.actor_name or f"gkd-rollout-{secrets.token_hex(4)}")
    short = shortfall(plan, ray.cluster_resources())
    if short:
        raise JobFailed(short)
    print(f"{PROG}: placing {plan.describe()}", flush=True)
    pg = placement_group(plan.bundles, strategy=plan.strategy, name=f"{plan.names[0]}-pg")
    actors: list[Any] = []
    learner_ref = None
    try:
        _wait_placed(pg, plan, ns.ready_timeout_s)
        for i, name in enumerate(plan.names):
            actors.append(
                start_rollout_actor(
                    settings,
                    name,
                    ns.rollout_num_cpus,
                    ns.rollout_num_gpus,
                    scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=i),
                )
            )
        for name in plan.names:  # the engines start in parallel; this waits for the slowest
            _wait_ready(RayClient(name, token=token), name, ns.ready_timeout_s)
        cfg.rollout.rollout_url, cfg.rollout.transport, cfg.rollout.token = plan.rollout_url, "ray", token
        if plan.learner_workers == 1:
            task = ray.remote(_learner_task).options(
                num_cpus=ns.learner_num_cpus,
                num_gpus=ns.learner_num_gpus,
                max_retries=0,  # a retry would restart training from scratch against a moved-on server
                runtime_env={"env_vars": plan.env},
                scheduling_strategy=PlacementGroupSchedulingStrategy(
                    pg, placement_group_bundle_index=plan.learner_bundle
                ),
            )
            learner_ref = task.remote(msgspec.msgpack.encode(cfg))
            print(f"{PROG}: learner started against {plan.rollout_url}", flush=True)
            out = _get(learner_ref, "learner")
        else:
            print(
                f"{PROG}: learner started on {plan.learner_workers} workers ({plan.backend}) against {plan.rollout_url}",
                flush=True,
            )
            out = _fit(cfg, plan, ns.ready_timeout_s)
        print(f"{PROG}: learner finished: {out}", flush=True)
        _report_replicas(plan, token)
    finally:
        if learner_ref is not None:
            ray.cancel(learner_ref, force=True)  # no-op when it finished
        for actor in actors:
            ray.kill(actor, no_restart=True)
        remove_placement_group(pg)


def _wait_placed(pg: Any, plan: Plan, timeout_s: float) -> None:
    """Block until the placement group holds every bundle (the cluster may be busy or scaling)."""
    import ray

    try:
        ray.get(pg.ready(), timeout=timeout_s)
    except ray.exceptions.GetTimeoutError:
        raise JobFailed(
            f"the cluster did not free {plan.bundles} within {timeout_s:g}s (--ready_timeout_s); "
            "lower --rollout_num_cpus/--rollout_num_gpus/--learner_num_cpus/--learner_num_gpus or add nodes"
        ) from None


def _fit(cfg: Config, plan: Plan, start_timeout_s: float) -> str:
    """The learner on plan.learner_workers Ray Train workers; torch.distributed is set up by Ray Train
    (MASTER_ADDR, RANK, WORLD_SIZE, LOCAL_RANK and the process group), which learner.dist picks up."""
    # Ray Train hands this to its controller: waiting for the workers' placement group is bounded
    # like the engines' start (its own default, 60 s, is short for a busy or scaling cluster).
    os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", str(start_timeout_s))
    from ray.train import FailureConfig, RunConfig, ScalingConfig, TrainingFailedError
    from ray.train.torch import TorchTrainer

    trainer = TorchTrainer(
        _learner_worker,
        train_loop_config={"cfg": msgspec.msgpack.encode(cfg), "env": plan.env},
        scaling_config=ScalingConfig(
            num_workers=plan.learner_workers,
            use_gpu=plan.learner.get("GPU", 0) > 0,
            resources_per_worker=plan.learner,
            placement_strategy=plan.strategy,
        ),
        run_config=RunConfig(
            name=f"gkd-learner-{secrets.token_hex(4)}",
            # Ray Train's own run state (no checkpoints of ours): next to the outputs, on the
            # filesystem every node already shares.
            storage_path=os.path.join(os.path.expanduser(cfg.train.output_dir), "ray_train"),
            # A retry would restart every rank from scratch against replicas that moved on;
            # `--resume latest` in a new job continues from the last checkpoint instead.
            failure_config=FailureConfig(max_failures=0),
        ),
    )
    try:
        trainer.fit()
    except TrainingFailedError as e:
        _print_cause(e)
        raise JobFailed(f"learner failed: {worker_cause(e)}") from None
    return cfg.train.output_dir


def worker_cause(e: BaseException) -> str:
    """One line for a failed TorchTrainer run: each failed rank's root cause (rank 0 first)."""
    from shared.transport.ray_transport import cause_line

    failures = getattr(e, "worker_failures", None)
    if failures:
        return "; ".join(f"rank {rank}: {cause_line(exc)}" for rank, exc in sorted(failures.items()))
    inner = getattr(e, "controller_failure", None)
    return cause_line(inner if inner is not None else e)


def _report_replicas(plan: Plan, token: str) -> None:
    """Each replica's final policy version and what it served, for the job's logs."""
    from shared.transport.base import RemoteError, ServerUnavailable
    from shared.transport.ray_transport import RayClient

    for name in plan.names:
        client = RayClient(name, token=token)
        try:
            st = client.status(timeout_s=60)
            print(
                f"{PROG}: replica ray://{name} at policy version {st.policy_version}, "
                f"served {st.served_requests} requests",
                flush=True,
            )
        except (ServerUnavailable, RemoteError) as e:
            print(f"{PROG}: replica ray://{name} did not answer at the end: {e}", flush=True)
        finally:
            client.close()


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


def _check_resources(cfg: Config, ns: Any, tensor_parallel_size: int = 1) -> list[str]:
    errs = problems(ns, tensor_parallel_size)
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


def _learner_worker(config: dict[str, Any]) -> None:
    """One TorchTrainer worker: the learner recipe as one rank (Ray Train set the rank's env and
    the process group; rank 0 pushes adapters and writes the outputs, as under torchrun)."""
    os.environ.update(config["env"])
    from learner.recipe import run as run_learner

    run_learner(msgspec.msgpack.decode(config["cfg"], type=Config))


def _print_cause(e: BaseException | None) -> None:
    # The remote traceback, for the job's logs; the one-line summary follows it.
    if e is not None:
        sys.stderr.write(f"{e}\n")


if __name__ == "__main__":
    sys.exit(main())
