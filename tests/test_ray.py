"""The Ray deployment, for real: a local Ray cluster and `ray job submit` of `deploy.ray_job`.

One cluster serves the whole module (CPU only, 2 CPUs, a 500 MB object store, its own ports and
temp dir), started with this venv's bin first on PATH so the job's `python` is ours. It is stopped
by its own PIDs at the end: never `ray stop`, which would stop every cluster on the machine.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import hf_logprobs

from shared import procs

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
# Not uploaded with the job's working dir (Ray also honours .gitignore).
EXCLUDES = [
    ".git",
    ".venv",
    "demo-output",
    "bench/out",
    "runs",
    ".cache",
    ".pytest_cache",
    "**/__pycache__",
    "*.egg-info",
]
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


@dataclass
class Cluster:
    address: str  # the dashboard's HTTP address, what `ray job submit --address` takes
    gcs: str  # host:port of the GCS, what `ray.init(address=...)` takes
    env: dict[str, str]  # environment for the `ray` CLI
    proc: subprocess.Popen  # `ray start --block`: exits when any of the head's processes dies
    tmp: Path  # --temp-dir parent; logs under ray/session_latest/logs

    def check_alive(self) -> None:
        """Fail with the head's own error lines if the cluster went down."""
        if self.proc.poll() is None:
            return
        logs = self.tmp / "ray" / "session_latest" / "logs"
        tails = [f"== ray start\n{(self.tmp / 'ray-start.log').read_text()[-2000:]}"]
        for f in ("raylet.out", "gcs_server.out", "dashboard_agent.log", "dashboard.log"):
            if (logs / f).is_file():
                bad = [
                    ln
                    for ln in (logs / f).read_text(errors="replace").splitlines()
                    if " E " in ln or " C " in ln or "ERROR" in ln
                ]
                tails.append(f"== {f}\n" + "\n".join(bad[-15:]))
        pytest.fail(f"the Ray cluster died (ray start exited {self.proc.returncode}):\n" + "\n".join(tails))


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


@pytest.fixture(scope="module")
def ray_cluster(server_pool):
    server_pool.stop()  # one vLLM engine at a time fits 2 cores and 24 GiB; ours live in the cluster
    # A short temp dir: Ray's unix sockets live under it and paths over 107 bytes fail.
    tmp = Path(tempfile.mkdtemp(prefix="gkdray-"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(
        PATH=f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        RAY_USAGE_STATS_ENABLED="0",
        # Two busy cores (vLLM, torch, other tests): give the head's liveness checks slack, so a
        # slow heartbeat is not taken for a dead node (which takes the whole head down).
        RAY_health_check_timeout_ms="30000",
        RAY_health_check_failure_threshold="20",
        RAY_agent_register_timeout_ms="300000",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
    )
    gcs, dash, client, agent, agent_grpc, rt_agent, metrics, nm, om = _free_ports(9)
    cmd = [
        str(VENV_BIN / "ray"), "start", "--head", "--block", "--disable-usage-stats",
        "--port", str(gcs), "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash),
        "--include-dashboard", "true", "--ray-client-server-port", str(client),
        "--dashboard-agent-listen-port", str(agent), "--dashboard-agent-grpc-port", str(agent_grpc),
        "--runtime-env-agent-port", str(rt_agent), "--metrics-export-port", str(metrics),
        "--node-manager-port", str(nm), "--object-manager-port", str(om),
        "--num-cpus", "2", "--num-gpus", "0", "--object-store-memory", "500000000",
        "--temp-dir", str(tmp / "ray"),
    ]  # fmt: skip
    log = tmp / "ray-start.log"
    proc = procs.start(cmd, log, {**{k: None for k in os.environ if k.startswith("RAY_")}, **env})
    try:
        address = f"http://127.0.0.1:{dash}"
        procs.wait_for(proc, log, lambda: _http_ok(f"{address}/api/version"), 120, "ray start", poll_s=1)
        yield Cluster(address=address, gcs=f"127.0.0.1:{gcs}", env=env, proc=proc, tmp=tmp)
    finally:
        # Ray workers get process groups of their own and SIGTERM alone leaves gcs_server and the
        # monitor running: procs.stop SIGKILLs every descendant still alive after the grace period.
        procs.stop(proc, grace_s=5)
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture(scope="module")
def tiny(tiny_models, tiny_dataset):
    return {
        "student": str(tiny_models.student),
        "teacher": str(tiny_models.teacher),
        "data": str(tiny_dataset),
    }


def _job_args(tiny, out: Path, student: str | None = None) -> list[str]:
    return [
        "--model_name_or_path", student or tiny["student"],
        "--teacher_model_name_or_path", tiny["teacher"],
        "--dataset_name", tiny["data"],
        "--output_dir", str(out),
        "--max_steps", "2", "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "1",
        "--max_new_tokens", "8", "--max_length", "128", "--lmbda", "1.0",
        "--use_peft", "--lora_r", "8", "--lora_alpha", "16",
        "--logging_steps", "1", "--save_steps", "100", "--eval_strategy", "no", "--sync_steps", "1",
        "--request_timeout_s", "300", "--reconnect_deadline_s", "60",
        "--rollout_num_cpus", "1", "--learner_num_cpus", "1", "--server_kv_cache_gb", "1",
        "--ready_timeout_s", "400",
    ]  # fmt: skip


def _submit(cluster: Cluster, args: list[str]) -> str:
    """`ray job submit` exactly as a user would; returns the submission id."""
    sid = f"gkd-test-{uuid.uuid4().hex[:8]}"
    cmd = [
        str(VENV_BIN / "ray"), "job", "submit", "--address", cluster.address, "--submission-id", sid,
        "--working-dir", str(REPO), "--runtime-env-json", json.dumps({"excludes": EXCLUDES}), "--no-wait",
        "--", "python", "-m", "deploy.ray_job", *args,
    ]  # fmt: skip
    deadline = time.monotonic() + 180
    while True:
        cluster.check_alive()
        r = subprocess.run(cmd, env=cluster.env, cwd=REPO, capture_output=True, text=True, timeout=180)
        # Right after start the dashboard answers before its job agent has registered.
        if r.returncode == 0 or "No available agent" not in r.stderr or time.monotonic() > deadline:
            break
        time.sleep(3)
    assert r.returncode == 0, f"ray job submit failed:\n{r.stdout}\n{r.stderr}"
    return sid


def _wait_job(cluster: Cluster, sid: str, deadline_s: float) -> tuple[str, str, float]:
    """Poll until the job ends; returns (status, logs, seconds). Stops it if the deadline passes."""
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(cluster.address)
    t0 = time.monotonic()
    status = "PENDING"
    while time.monotonic() - t0 < deadline_s:
        cluster.check_alive()
        status = str(client.get_job_status(sid).value)
        if status in TERMINAL:
            break
        time.sleep(2)
    else:
        client.stop_job(sid)
    return status, client.get_job_logs(sid), time.monotonic() - t0


def test_ray_job_trains_and_writes_outputs(ray_cluster, tiny, tmp_path):
    out = tmp_path / "out"
    sid = _submit(ray_cluster, _job_args(tiny, out))
    status, logs, secs = _wait_job(ray_cluster, sid, deadline_s=900)
    print(f"ray job {sid}: {status} in {secs:.0f} s")
    assert status == "SUCCEEDED", f"job {sid} ended {status} after {secs:.0f} s; logs:\n{logs[-6000:]}"
    assert "rollout server" in logs and "ready" in logs
    assert (out / "adapter_model.safetensors").is_file()
    assert (out / "adapter_config.json").is_file()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    assert rows, "metrics.jsonl is empty"
    assert max(int(r["step"]) for r in rows) == 2
    # The learner pushed adapters over the Ray transport: the server ended above the base version.
    assert any(r.get("policy_version", 0) >= 1 for r in rows), rows


def test_ray_job_failure_in_rollout_actor_fails_the_job(ray_cluster, tiny, tmp_path):
    """A model vLLM cannot load fails inside the rollout actor; the job must end FAILED, quickly,
    with the cause in its logs (not hang waiting for a server that will never answer)."""
    broken = tmp_path / "broken-model"
    shutil.copytree(tiny["student"], broken)
    cfg = json.loads((broken / "config.json").read_text())
    cfg["model_type"] = "no_such_architecture"
    (broken / "config.json").write_text(json.dumps(cfg))
    sid = _submit(ray_cluster, _job_args(tiny, tmp_path / "out", student=str(broken)))
    status, logs, secs = _wait_job(ray_cluster, sid, deadline_s=300)
    print(f"ray job {sid}: {status} in {secs:.0f} s")
    assert status == "FAILED", f"job {sid} ended {status} after {secs:.0f} s; logs:\n{logs[-6000:]}"
    errors = [ln for ln in logs.splitlines() if ln.startswith("deploy.ray_job: error: rollout server")]
    assert errors, logs[-6000:]
    assert "no_such_architecture" in errors[-1], errors  # the cause, in the one line


def test_ray_transport_round_trip_and_errors(ray_cluster, tiny, make_adapter):
    """RayClient against a RolloutActor directly: generate, push, and every error mapped to ours."""
    import ray

    from rollout_server.ray_actor import start_rollout_actor
    from rollout_server.settings import ServerSettings
    from shared.messages import GenerateRequest, Prompt, SamplingSpec
    from shared.transport import RemoteError, ServerUnavailable, connect
    from shared.transport.ray_transport import NAMESPACE

    adapter = make_adapter()
    canary = [5, 6, 7, 8, 9, 10]
    ray_cluster.check_alive()  # ray.init would retry a dead GCS for minutes
    ray.init(address=ray_cluster.gcs, namespace=NAMESPACE, log_to_driver=False)
    try:
        name = f"t-rollout-{uuid.uuid4().hex[:6]}"
        settings = ServerSettings(model=tiny["student"], token="sekret", kv_cache_gb=1, max_model_len=256)
        actor = start_rollout_actor(settings, name, num_cpus=1)
        client = connect(f"ray://{name}", token="sekret", timeout_s=300)
        assert client.status().healthy  # waits for the engine inside the actor

        greedy = SamplingSpec(temperature=0.0, max_new_tokens=6)
        req = GenerateRequest(
            request_id="a", prompts=[Prompt(prompt_id="p", token_ids=[5, 6, 7])], sampling=greedy
        )
        assert client.submit(req) == "a"
        before = client.result("a", timeout_s=120)
        assert before.policy_version == 0 and len(before.completions[0].token_ids) == 6

        pushed = client.push_adapter(adapter.push(1, canary), timeout_s=120)
        assert pushed.version == 1
        # The server scored the canary with exactly the adapter we sent (fp32 on CPU: tight).
        expect = hf_logprobs(adapter.merged, canary)
        assert max(abs(a - b) for a, b in zip(pushed.canary_logprobs, expect, strict=True)) < 1e-3
        after = client.generate(
            GenerateRequest(request_id="b", prompts=req.prompts, sampling=greedy), timeout_s=120
        )
        assert after.policy_version == 1

        with pytest.raises(RemoteError) as e:
            connect(f"ray://{name}", token="wrong", timeout_s=30).status()
        assert e.value.code == "unauthorized"
        with pytest.raises(ServerUnavailable, match="no such actor"):
            connect("ray://nobody-here", lookup_timeout_s=1)

        ray.kill(actor, no_restart=True)
        with pytest.raises(ServerUnavailable, match="gone"):
            client.status(timeout_s=30)
        client.close()
    finally:
        ray.shutdown()


def test_ray_job_two_replicas_two_learner_workers(ray_cluster, tiny, tmp_path):
    """`--rollout_replicas 2 --learner_workers 2`: two named rollout actors in the job's placement
    group, a two-rank learner under Ray Train (gloo), one replica set over both. The run ends
    SUCCEEDED with the adapter written once, and both replicas serve the final version."""
    out = tmp_path / "out"
    # Half a CPU each: 2 replicas + 2 learner workers on the fixture's 2-CPU cluster.
    args = _job_args(tiny, out)
    for flag in ("--rollout_num_cpus", "--learner_num_cpus"):
        args[args.index(flag) + 1] = "0.5"
    args += ["--rollout_replicas", "2", "--learner_workers", "2", "--actor_name", "t-pair"]
    sid = _submit(ray_cluster, args)
    status, logs, secs = _wait_job(ray_cluster, sid, deadline_s=1200)
    print(f"ray job {sid}: {status} in {secs:.0f} s")
    print("\n".join(ln for ln in logs.splitlines() if ln.startswith("deploy.ray_job:")))
    assert status == "SUCCEEDED", f"job {sid} ended {status} after {secs:.0f} s; logs:\n{logs[-8000:]}"
    assert "2 learner worker(s)" in logs and "(gloo)" in logs, logs[-4000:]
    assert "against ray://t-pair-0,ray://t-pair-1" in logs, logs[-4000:]
    assert (out / "adapter_model.safetensors").is_file()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    train = [r for r in rows if "loss" in r]
    assert max(int(r["step"]) for r in train) == 2
    final = max(int(r.get("policy_version", 0)) for r in rows)
    assert final >= 1, rows
    # Both replicas were in the learner's set, and each ends at the final version (the job asks
    # every actor its status after the learner finished).
    assert {f["replica"] for f in train[-1]["replicas"]} == {"ray://t-pair-0", "ray://t-pair-1"}
    ends, served = {}, {}
    for ln in logs.splitlines():
        if ln.startswith("deploy.ray_job: replica ray://"):
            name, _, rest = ln.removeprefix("deploy.ray_job: replica ").partition(" at policy version ")
            ends[name] = int(rest.split(",")[0])
            served[name] = int(rest.split("served ")[1].split()[0])
    assert ends == {"ray://t-pair-0": final, "ray://t-pair-1": final}, (ends, logs[-4000:])
    assert all(n > 0 for n in served.values()), served  # routing used both


def test_ray_job_resume_latest_with_the_same_workers(ray_cluster, tiny, tmp_path):
    """`--resume latest` in a new job with the same `--learner_workers 2` continues from the last
    checkpoint: steps 1-2 in one job, 3-4 in the next, contiguous, one run id."""
    # Two more 2 x 2 jobs (~2 min on 2 cores): more than the CI suite can spend, so it is opt-in.
    if os.environ.get("GKD_RUN_RAY_RESUME_TEST") != "1":
        pytest.skip("two more Ray jobs; set GKD_RUN_RAY_RESUME_TEST=1 to run it")
    out = tmp_path / "out"
    args = _job_args(tiny, out)
    for flag, value in (("--rollout_num_cpus", "0.5"), ("--learner_num_cpus", "0.5"), ("--save_steps", "1")):
        args[args.index(flag) + 1] = value
    args += ["--rollout_replicas", "2", "--learner_workers", "2", "--actor_name", "t-resume"]
    for max_steps, extra in (("2", []), ("4", ["--resume", "latest"])):
        args[args.index("--max_steps") + 1] = max_steps
        sid = _submit(ray_cluster, args + extra)
        status, logs, secs = _wait_job(ray_cluster, sid, deadline_s=1200)
        print(f"ray job {sid} (max_steps {max_steps} {' '.join(extra)}): {status} in {secs:.0f} s")
        assert status == "SUCCEEDED", f"job {sid} ended {status} after {secs:.0f} s; logs:\n{logs[-8000:]}"
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    steps = [int(r["step"]) for r in rows if "loss" in r]
    assert steps == [1, 2, 3, 4], steps  # none lost, none repeated
    starts = [r for r in rows if "resumed_from" in r]
    assert [s["resumed_from"] is None for s in starts] == [True, False], starts
    assert len({s["run_id"] for s in starts}) == 1, starts
