"""deploy/: the compose file is valid Compose and its commands are ones our CLIs accept.

No Docker engine runs here, so the compose file is checked against the Compose Specification's JSON
schema (vendored in deploy/schemas/), and every command in it is parsed by the real parsers.
"""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
# What a user exports before `docker compose up`; defaults in the file fill in the rest.
ENV = {"GKD_TOKEN": "test-token"}


def interpolate(value, env: dict[str, str]):
    """Compose's ${VAR}, ${VAR:-default} and ${VAR:?error} substitution, applied recursively."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def sub(m: re.Match) -> str:
        name, op, arg = m["name"], m["op"], m["arg"] or ""
        if env.get(name):
            return env[name]
        if op == ":?":
            raise KeyError(f"{name} must be set: {arg}")
        return arg if op == ":-" else ""

    return re.sub(r"\$\{(?P<name>\w+)(?:(?P<op>:-|:\?)(?P<arg>[^}]*))?\}", sub, value)


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((DEPLOY / "compose.yaml").read_text())


@pytest.fixture(scope="module")
def services(compose) -> dict:
    return interpolate(compose, ENV)["services"]


def _validator():
    import jsonschema

    schema = json.loads((DEPLOY / "schemas" / "compose-spec.json").read_text())
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema, format_checker=cls.FORMAT_CHECKER)


def test_compose_file_validates_against_the_compose_spec(compose):
    errors = [
        f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in _validator().iter_errors(compose)
    ]
    assert not errors, "\n".join(errors)


def test_the_schema_catches_mistakes(compose):
    """The check above is only worth something if a wrong file fails it."""
    import copy

    bad = copy.deepcopy(compose)
    bad["services"]["rollout"]["deploy"]["resources"]["reservations"]["devices"][0]["drivr"] = "nvidia"
    bad["services"]["learner"]["depends_on"]["rollout"]["condition"] = "service_up"
    messages = [e.message for e in _validator().iter_errors(bad)]
    assert any("drivr" in m for m in messages), messages
    assert any("service_up" in m for m in messages), messages


def test_services_reserve_gpus_share_volumes_and_wait_for_health(services):
    for name in ("rollout", "learner"):
        devices = services[name]["deploy"]["resources"]["reservations"]["devices"]
        assert devices and all(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices), name
        mounts = {v.split(":")[1] for v in services[name]["volumes"]}
        assert {"/outputs", "/cache/huggingface"} <= mounts, name
        assert services[name]["environment"]["GKD_TOKEN"] == ENV["GKD_TOKEN"], name
    gpu_ids = [
        set(services[n]["deploy"]["resources"]["reservations"]["devices"][0]["device_ids"])
        for n in ("rollout", "learner")
    ]
    assert not gpu_ids[0] & gpu_ids[1], "rollout and learner must not share a GPU"
    assert services["learner"]["depends_on"]["rollout"]["condition"] == "service_healthy"
    assert "deploy.healthcheck" in services["rollout"]["healthcheck"]["test"]


def test_compose_refuses_to_start_without_a_token(compose):
    with pytest.raises(KeyError, match="GKD_TOKEN"):
        interpolate(compose, {})


def test_rollout_command_parses_with_the_server_cli(services):
    from rollout_server.cli import parse_settings

    cmd = services["rollout"]["command"]
    assert cmd[0] == "gkd-rollout-server"
    settings, _ = parse_settings(cmd[1:])
    assert settings.host == "0.0.0.0" and settings.port == 5555 and settings.http_port == 8000
    # The learner connects to the port the server binds.
    assert f"tcp://rollout:{settings.port}" in services["learner"]["command"]


def test_learner_command_parses_with_the_learner_cli(services, monkeypatch):
    from shared.config import parse_args

    monkeypatch.setenv("GKD_TOKEN", ENV["GKD_TOKEN"])  # what the container's environment holds
    cmd = services["learner"]["command"]
    assert cmd[0] == "gkd-learner"
    cfg, _ = parse_args(cmd[1:])
    assert cfg.rollout.rollout_url == "tcp://rollout:5555"
    assert cfg.rollout.token == ENV["GKD_TOKEN"]
    assert cfg.train.output_dir.startswith("/outputs/")
    assert cfg.model.model_name_or_path == services["rollout"]["command"][2], (
        "learner and server must share the student"
    )


def test_a_wrong_flag_in_a_command_would_be_caught(services, capsys):
    """The parsers really reject unknown flags (so the two tests above can fail)."""
    from rollout_server.cli import parse_settings
    from shared.config import parse_args

    with pytest.raises(SystemExit) as e:
        parse_args([*services["learner"]["command"][1:], "--no_such_flag", "1"])
    assert e.value.code == 2
    with pytest.raises(SystemExit):
        parse_settings([*services["rollout"]["command"][1:], "--no_such_flag", "1"])


def test_healthcheck_cli_parses(services):
    from deploy import healthcheck

    test = services["rollout"]["healthcheck"]["test"]
    assert test[:4] == ["CMD", "python3", "-m", "deploy.healthcheck"]
    with pytest.raises(SystemExit) as e:
        healthcheck.main([*test[4:], "--help"])
    assert e.value.code == 0


def test_dockerfile_runs_our_console_scripts():
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    text = (DEPLOY / "Dockerfile").read_text()
    execs = [json.loads(m) for m in re.findall(r"^(?:CMD|ENTRYPOINT)\s+(\[.*\])\s*$", text, re.M)]
    assert [] in execs, "the base image's `vllm serve` entrypoint must be cleared"
    commands = [e[0] for e in execs if e]
    assert commands and all(c in scripts for c in commands), (commands, list(scripts))
    assert re.search(r"pip install .*\.\[gpu\]", text), "the image must install this package with vLLM"
    # The compose services build this Dockerfile and run console scripts it installs.
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    for name, svc in compose["services"].items():
        assert svc["build"]["dockerfile"] == "deploy/Dockerfile", name
        assert svc["command"][0] in scripts, name


def test_healthcheck_reports_unhealthy_when_nothing_listens(capsys):
    import socket

    from deploy import healthcheck

    with socket.socket() as s:  # a port that was free a moment ago: nobody answers there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert healthcheck.main(["--url", f"tcp://127.0.0.1:{port}", "--token", "t", "--timeout_s", "1"]) == 1
    assert capsys.readouterr().err.startswith("unhealthy:")


# ---------------------------------------------------------------- deploy.ray_job: the server's settings


def _ray_job_settings(tmp_path, *flags: str):
    from deploy import ray_job
    from shared.config import parse_args

    (tmp_path / "model").mkdir(exist_ok=True)
    (tmp_path / "data.jsonl").write_text('{"prompt": "hi"}\n')
    argv = [
        "--model_name_or_path",
        str(tmp_path / "model"),
        "--teacher_model_name_or_path",
        str(tmp_path / "model"),
    ]
    argv += ["--dataset_name", str(tmp_path / "data.jsonl"), "--output_dir", str(tmp_path / "out"), *flags]
    cfg, ns = parse_args(argv, prog=ray_job.PROG, extra=ray_job.EXTRA + ray_job.server_flags())
    return cfg, ray_job.server_settings(cfg, ns, "tok")


def test_ray_job_offers_every_server_setting_it_does_not_own():
    """A setting added to ServerSettings becomes --server_<name> of the Ray job by itself."""
    import msgspec

    from deploy import ray_job
    from rollout_server.settings import ServerSettings

    offered = {kw["dest"].removeprefix("server_") for _, kw in ray_job.server_flags()}
    fields = {f.name for f in msgspec.structs.fields(ServerSettings)}
    assert offered == fields - set(ray_job.JOB_OWNED)
    assert {"enforce_eager", "max_num_seqs", "max_message_mb", "kv_cache_gb", "sync_mode"} <= offered


def test_ray_job_passes_server_flags_and_derives_the_rest(tmp_path):
    cfg, s = _ray_job_settings(
        tmp_path,
        *("--server_enforce_eager", "false", "--server_max_num_seqs", "8", "--server_max_message_mb", "16"),
        *("--server_sync_mode", "lora", "--max_length", "300", "--lora_r", "96", "--seed", "7"),
    )
    assert (s.enforce_eager, s.max_num_seqs, s.max_message_mb, s.sync_mode) == (False, 8, 16, "lora")
    assert (s.model, s.token, s.max_model_len, s.max_lora_rank, s.seed) == (
        cfg.model.model_name_or_path,
        "tok",
        300,
        96,
        7,
    )
    _, s = _ray_job_settings(tmp_path)
    assert (s.kv_cache_gb, s.dtype, s.max_num_seqs) == (1.0, "auto", 64)  # the server's own defaults


@pytest.mark.parametrize(
    ("flags", "needle"),
    [
        (("--server_max_num_seqs", "0"), "--server_max_num_seqs=0 is invalid: must be > 0"),
        (("--server_gpu_memory_utilization", "1.5"), "--server_gpu_memory_utilization=1.5 is invalid"),
        (
            ("--server_max_lora_rank", "8", "--lora_r", "16"),
            "server_max_lora_rank=8 is invalid: must be >= lora_r=16",
        ),
    ],
)
def test_ray_job_refuses_server_settings_that_cannot_work(tmp_path, flags, needle):
    from shared.config import ConfigError

    with pytest.raises(ConfigError) as e:
        _ray_job_settings(tmp_path, *flags)
    assert any(needle in line for line in e.value.errors), e.value.errors
