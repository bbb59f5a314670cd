"""deploy.ray_job's placement (deploy.ray_plan), from the real command line: the rollout actors'
names and bundles, the learner workers' resources, and the flags it refuses before Ray starts."""

from __future__ import annotations

import pytest

from deploy import ray_job
from deploy.ray_plan import make_plan, shortfall
from shared.config import parse_args


def _parse(tmp_path, *flags: str):
    (tmp_path / "model").mkdir(exist_ok=True)
    (tmp_path / "data.jsonl").write_text('{"prompt": "hi"}\n')
    argv = [
        "--model_name_or_path", str(tmp_path / "model"), "--teacher_model_name_or_path", str(tmp_path / "model"),
        "--dataset_name", str(tmp_path / "data.jsonl"), "--output_dir", str(tmp_path / "out"), *flags,
    ]  # fmt: skip
    cfg, ns = parse_args(argv, prog=ray_job.PROG, extra=ray_job.EXTRA + ray_job.server_flags())
    return cfg, ns, argv


def test_two_replicas_two_workers_on_cpu(tmp_path):
    _, ns, _ = _parse(
        tmp_path,
        *("--rollout_replicas", "2", "--learner_workers", "2", "--actor_name", "gkd"),
        *("--rollout_num_cpus", "0.5", "--learner_num_cpus", "2"),
    )
    plan = make_plan(ns, ns.actor_name)
    assert plan.names == ["gkd-0", "gkd-1"]
    assert plan.rollout_url == "ray://gkd-0,ray://gkd-1"
    # CPU bundles only (no zero GPU entries); the learner workers are Ray Train's own group.
    assert plan.bundles == [{"CPU": 0.5}, {"CPU": 0.5}]
    assert plan.learner == {"CPU": 2.0} and plan.learner_workers == 2
    assert plan.learner_bundle is None
    assert plan.backend == "gloo" and plan.strategy == "PACK"
    assert "2 rollout replica(s) x 0.5 CPU, 2 learner worker(s) x 2 CPU (gloo)" in plan.describe()


def test_one_replica_one_worker_keeps_the_name_and_places_the_learner_task_too(tmp_path):
    _, ns, _ = _parse(tmp_path, "--actor_name", "solo", "--placement_strategy", "SPREAD")
    plan = make_plan(ns, ns.actor_name)
    assert plan.names == ["solo"] and plan.rollout_url == "ray://solo"
    assert plan.bundles == [{"CPU": 1.0}, {"CPU": 1.0}]  # the replica's, then the learner task's
    assert plan.learner_bundle == 1 and plan.strategy == "SPREAD"


def test_gpu_workers_use_nccl_and_bundles_carry_the_gpus(tmp_path):
    _, ns, _ = _parse(
        tmp_path,
        *("--rollout_replicas", "3", "--rollout_num_gpus", "2", "--server_tensor_parallel_size", "2"),
        *("--learner_workers", "4", "--learner_num_gpus", "1", "--learner_num_cpus", "0"),
    )
    plan = make_plan(ns, "r")
    assert plan.bundles == [{"CPU": 1.0, "GPU": 2.0}] * 3
    assert plan.learner == {"GPU": 1.0} and plan.backend == "nccl"
    assert shortfall(plan, {"CPU": 8.0, "GPU": 10.0}) is None
    assert shortfall(plan, {"CPU": 8.0, "GPU": 8.0}) == (
        "the job needs 10 GPU (the cluster has 8): " + plan.describe()
    )


@pytest.mark.parametrize(
    ("flags", "needle"),
    [
        (("--rollout_replicas", "0"), "rollout_replicas=0 is invalid: must be >= 1"),
        (("--learner_workers", "0"), "learner_workers=0 is invalid: must be >= 1"),
        (("--learner_num_cpus", "0"), "learner_num_cpus and learner_num_gpus are both 0"),
        (("--rollout_num_gpus", "-1"), "rollout_num_gpus=-1.0 is invalid: must be >= 0"),
        (
            ("--server_tensor_parallel_size", "2", "--rollout_num_gpus", "1"),
            "rollout_num_gpus=1.0 is invalid: server_tensor_parallel_size=2 needs that many GPUs",
        ),
    ],
)
def test_bad_placement_flags_exit_2_with_one_line_before_ray_starts(tmp_path, capsys, flags, needle):
    _, _, argv = _parse(tmp_path, *flags)
    with pytest.raises(SystemExit) as e:
        ray_job.main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert needle in err, err
    assert err.startswith("deploy.ray_job: error: ")


def test_the_cluster_too_small_is_one_line(tmp_path):
    _, ns, _ = _parse(tmp_path, "--rollout_replicas", "2", "--learner_workers", "2")
    msg = shortfall(make_plan(ns, "x"), {"CPU": 2.0, "memory": 1e9})
    assert msg is not None and msg.startswith("the job needs 4 CPU (the cluster has 2): 2 rollout replica(s)")


def test_a_failed_worker_names_its_rank_and_root_cause():
    from ray.train import WorkerGroupError

    boom = RuntimeError(
        "Traceback (most recent call last):\n  File x\nlearner.errors.UserError: no data left"
    )
    e = WorkerGroupError("rank 1 failed", {1: boom, 0: ValueError("ValueError: bad shard")})
    assert (
        ray_job.worker_cause(e)
        == "rank 0: ValueError: bad shard; rank 1: learner.errors.UserError: no data left"
    )
