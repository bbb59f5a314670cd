"""Where `deploy.ray_job` puts things: the rollout actors' names and placement bundles, and the
learner workers' resources. Pure data from the job's flags, so it is checked before Ray starts.

- N rollout replicas (`--rollout_replicas`), each a named actor with `--rollout_num_cpus` CPUs
  and `--rollout_num_gpus` GPUs, one bundle each in the job's placement group. One replica keeps
  the `--actor_name` as it is; several get `<actor_name>-0`, `<actor_name>-1`, ... The learner gets
  them all as one replica set: `--rollout_url ray://<name0>,ray://<name1>,...`.
- One learner worker (`--learner_workers 1`, the default) is a Ray task on one more bundle of the
  same placement group. G > 1 workers run under Ray Train's TorchTrainer, which reserves a
  placement group of its own (G bundles of `--learner_num_cpus`/`--learner_num_gpus`, the same
  `--placement_strategy`) and starts torch.distributed: NCCL when the workers have GPUs, else gloo.
- A bundle holds only the resources it asks for (Ray refuses empty or zero-valued entries), so a
  replica or worker needs at least one CPU or GPU, fractions allowed (0.5 CPU on a small box).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")


@dataclass(frozen=True)
class Plan:
    names: list[str]  # the rollout actors' names, one per replica
    rollout: dict[str, float]  # resources of one rollout replica (one bundle each)
    learner: dict[str, float]  # resources of one learner worker
    learner_workers: int  # G: 1 is a Ray task, more run under TorchTrainer
    strategy: str = "PACK"  # Ray placement strategy for the bundles
    env: dict[str, str] = field(default_factory=dict)  # extra env of every learner worker

    @property
    def rollout_url(self) -> str:
        """What the learner gets as --rollout_url: one ray:// URL per replica, comma-separated."""
        return ",".join(f"ray://{n}" for n in self.names)

    @property
    def bundles(self) -> list[dict[str, float]]:
        """The job's placement group: one bundle per replica, then the learner task's when G == 1
        (TorchTrainer places G > 1 workers in a group of its own)."""
        out = [dict(self.rollout) for _ in self.names]
        if self.learner_workers == 1:
            out.append(dict(self.learner))
        return out

    @property
    def learner_bundle(self) -> int | None:
        """Index of the learner task's bundle (None when TorchTrainer places the workers)."""
        return len(self.names) if self.learner_workers == 1 else None

    @property
    def backend(self) -> str:
        """torch.distributed backend of the learner workers (what TorchTrainer picks itself)."""
        return "nccl" if self.learner.get("GPU", 0) > 0 else "gloo"

    def describe(self) -> str:
        """One line for the job's log."""
        return (
            f"{len(self.names)} rollout replica(s) x {_fmt(self.rollout)}, "
            f"{self.learner_workers} learner worker(s) x {_fmt(self.learner)}"
            + (f" ({self.backend})" if self.learner_workers > 1 else "")
            + f", placement {self.strategy}"
        )


def resources(num_cpus: float, num_gpus: float) -> dict[str, float]:
    """A bundle: only the non-zero resources."""
    return {k: float(v) for k, v in (("CPU", num_cpus), ("GPU", num_gpus)) if v > 0}


def replica_names(base: str, n: int) -> list[str]:
    return [base] if n == 1 else [f"{base}-{i}" for i in range(n)]


def problems(ns: Any, tensor_parallel_size: int = 1) -> list[str]:
    """What is wrong with the placement flags (one line each)."""
    errs = []
    for flag in ("rollout_num_cpus", "rollout_num_gpus", "learner_num_cpus", "learner_num_gpus"):
        if getattr(ns, flag) < 0:
            errs.append(f"{flag}={getattr(ns, flag)!r} is invalid: must be >= 0")
    for flag in ("rollout_replicas", "learner_workers"):
        if getattr(ns, flag) < 1:
            errs.append(f"{flag}={getattr(ns, flag)!r} is invalid: must be >= 1")
    for side in ("rollout", "learner"):
        if getattr(ns, f"{side}_num_cpus") <= 0 and getattr(ns, f"{side}_num_gpus") <= 0:
            errs.append(
                f"{side}_num_cpus and {side}_num_gpus are both 0: each {side} needs a CPU or GPU share to be placed"
            )
    if ns.placement_strategy not in STRATEGIES:
        errs.append(
            f"placement_strategy={ns.placement_strategy!r} is invalid: one of {', '.join(STRATEGIES)}"
        )
    if tensor_parallel_size > 1 and ns.rollout_num_gpus < tensor_parallel_size:
        errs.append(
            f"rollout_num_gpus={ns.rollout_num_gpus!r} is invalid: server_tensor_parallel_size="
            f"{tensor_parallel_size} needs that many GPUs per replica"
        )
    return errs


def make_plan(ns: Any, base_name: str) -> Plan:
    """The plan for checked flags (see `problems`)."""
    return Plan(
        names=replica_names(base_name, ns.rollout_replicas),
        rollout=resources(ns.rollout_num_cpus, ns.rollout_num_gpus),
        learner=resources(ns.learner_num_cpus, ns.learner_num_gpus),
        learner_workers=ns.learner_workers,
        strategy=ns.placement_strategy,
        env={"TOKENIZERS_PARALLELISM": "false"},
    )


def _fmt(res: dict[str, float]) -> str:
    return " ".join(f"{v:g} {k}" for k, v in res.items())


def shortfall(plan: Plan, cluster: dict[str, float]) -> str | None:
    """Why the cluster (its total resources, `ray.cluster_resources()`) can never hold the plan,
    or None: a job that cannot fit fails at once instead of waiting for bundles."""
    need: dict[str, float] = {}
    for res, n in ((plan.rollout, len(plan.names)), (plan.learner, plan.learner_workers)):
        for k, v in res.items():
            need[k] = need.get(k, 0.0) + v * n
    short = [
        f"{v:g} {k} (the cluster has {cluster.get(k, 0):g})"
        for k, v in need.items()
        if v > cluster.get(k, 0) + 1e-9
    ]
    if not short:
        return None
    return f"the job needs {', '.join(short)}: {plan.describe()}"
