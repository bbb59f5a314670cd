"""The one config tree: the seed's flags, defaults, files, validation and the resolved config.json."""

from __future__ import annotations

import json

import pytest

from learner.cli import main
from shared.config import Config, ConfigError, from_json, parse_args, rollout_url, write_resolved

SEED_FLAGS = [
    "model_name_or_path",
    "teacher_model_name_or_path",
    "dataset_name",
    "dataset_config",
    "dataset_train_split",
    "dataset_test_split",
    "learning_rate",
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "output_dir",
    "num_train_epochs",
    "max_steps",
    "push_to_hub",
    "gradient_checkpointing",
    "use_peft",
    "lora_r",
    "lora_alpha",
    "lora_dropout",
    "lora_target_modules",
    "lmbda",
    "beta",
    "temperature",
    "max_new_tokens",
    "seq_kd",
    "disable_dropout",
    "torch_dtype",
    "attn_implementation",
    "trust_remote_code",
    "model_revision",
    "eval_strategy",
    "eval_steps",
    "logging_steps",
    "save_steps",
    "seed",
    "max_length",
]

SEED_COMMAND = [
    "--model_name_or_path",
    "Qwen/Qwen2-0.5B-Instruct",
    "--teacher_model_name_or_path",
    "Qwen/Qwen2-1.5B-Instruct",
    "--dataset_name",
    "trl-lib/chatbot_arena_completions",
    "--learning_rate",
    "2e-4",
    "--per_device_train_batch_size",
    "4",
    "--gradient_accumulation_steps",
    "8",
    "--output_dir",
    "gkd-model",
    "--num_train_epochs",
    "1",
    "--push_to_hub",
    "--gradient_checkpointing",
    "--use_peft",
    "--lora_r",
    "64",
    "--lora_alpha",
    "16",
]

REQUIRED = [
    "--model_name_or_path",
    "Qwen/Qwen2-0.5B-Instruct",
    "--teacher_model_name_or_path",
    "Qwen/Qwen2-1.5B-Instruct",
    "--dataset_name",
    "trl-lib/chatbot_arena_completions",
]


def test_seed_command_line_parses_with_its_meaning():
    cfg, _ = parse_args(SEED_COMMAND)
    assert cfg.model.model_name_or_path == "Qwen/Qwen2-0.5B-Instruct"
    assert cfg.model.teacher_model_name_or_path == "Qwen/Qwen2-1.5B-Instruct"
    assert cfg.data.dataset_name == "trl-lib/chatbot_arena_completions"
    assert cfg.train.learning_rate == 2e-4
    assert cfg.train.per_device_train_batch_size == 4
    assert cfg.train.gradient_accumulation_steps == 8
    assert cfg.train.output_dir == "gkd-model"
    assert cfg.train.num_train_epochs == 1.0
    assert cfg.train.push_to_hub is True
    assert cfg.train.gradient_checkpointing is True
    assert cfg.lora.use_peft is True
    assert (cfg.lora.lora_r, cfg.lora.lora_alpha) == (64, 16)


def test_seed_defaults():
    cfg, _ = parse_args(REQUIRED)
    g = cfg.gkd
    assert (g.temperature, g.lmbda, g.beta, g.max_new_tokens, g.seq_kd) == (0.9, 0.5, 0.5, 128, False)
    assert cfg.train.disable_dropout is True
    assert cfg.train.push_to_hub is False
    assert cfg.lora.lora_target_modules is None  # None = all linear projections


def test_every_seed_flag_is_accepted_with_its_meaning(tmp_path):
    argv = REQUIRED + [
        "--dataset_config",
        "default",
        "--dataset_train_split",
        "tr",
        "--dataset_test_split",
        "te",
        "--learning_rate",
        "1e-3",
        "--per_device_train_batch_size",
        "2",
        "--gradient_accumulation_steps",
        "3",
        "--output_dir",
        str(tmp_path),
        "--num_train_epochs",
        "2.5",
        "--max_steps",
        "7",
        "--push_to_hub",
        "false",
        "--gradient_checkpointing",
        "--use_peft",
        "--lora_r",
        "8",
        "--lora_alpha",
        "4",
        "--lora_dropout",
        "0.1",
        "--lora_target_modules",
        "q_proj",
        "v_proj",
        "--lmbda",
        "0.25",
        "--beta",
        "0.75",
        "--temperature",
        "1.3",
        "--max_new_tokens",
        "32",
        "--seq_kd",
        "--disable_dropout",
        "false",
        "--torch_dtype",
        "bfloat16",
        "--attn_implementation",
        "eager",
        "--trust_remote_code",
        "--model_revision",
        "v1",
        "--eval_strategy",
        "steps",
        "--eval_steps",
        "5",
        "--logging_steps",
        "2",
        "--save_steps",
        "9",
        "--seed",
        "3",
        "--max_length",
        "256",
    ]
    cfg, _ = parse_args(argv)
    d, t, lo, g, m = cfg.data, cfg.train, cfg.lora, cfg.gkd, cfg.model
    assert (d.dataset_config, d.dataset_train_split, d.dataset_test_split, d.max_length) == (
        "default",
        "tr",
        "te",
        256,
    )
    assert (t.learning_rate, t.per_device_train_batch_size, t.gradient_accumulation_steps) == (1e-3, 2, 3)
    assert (t.output_dir, t.num_train_epochs, t.max_steps, t.push_to_hub) == (str(tmp_path), 2.5, 7, False)
    assert (t.gradient_checkpointing, t.disable_dropout, t.eval_strategy, t.eval_steps) == (
        True,
        False,
        "steps",
        5,
    )
    assert (t.logging_steps, t.save_steps, t.seed) == (2, 9, 3)
    assert (lo.use_peft, lo.lora_r, lo.lora_alpha, lo.lora_dropout, lo.lora_target_modules) == (
        True,
        8,
        4,
        0.1,
        ["q_proj", "v_proj"],
    )
    assert (g.lmbda, g.beta, g.temperature, g.max_new_tokens, g.seq_kd) == (0.25, 0.75, 1.3, 32, True)
    assert (m.torch_dtype, m.attn_implementation, m.trust_remote_code, m.model_revision) == (
        "bfloat16",
        "eager",
        True,
        "v1",
    )
    assert set(SEED_FLAGS) <= {
        f for sec in ("model", "lora", "data", "train", "gkd") for f in getattr(cfg, sec).__struct_fields__
    }


@pytest.mark.parametrize("suffix", ["yaml", "toml"])
def test_config_file_and_flags_override_it(tmp_path, suffix):
    path = tmp_path / f"run.{suffix}"
    if suffix == "yaml":
        path.write_text(
            "gkd:\n  lmbda: 0.2\n  beta: 0.1\nlearning_rate: 0.001\nmodel_name_or_path: a/b\n"
            "teacher_model_name_or_path: c/d\ndataset_name: e/f\nlora_target_modules: [q_proj, k_proj]\n"
        )
    else:
        path.write_text(
            'learning_rate = 0.001\nmodel_name_or_path = "a/b"\nteacher_model_name_or_path = "c/d"\n'
            'dataset_name = "e/f"\nlora_target_modules = ["q_proj", "k_proj"]\n[gkd]\nlmbda = 0.2\nbeta = 0.1\n'
        )
    cfg, _ = parse_args(["--config", str(path), "--beta", "0.9"])
    assert cfg.gkd.lmbda == 0.2  # from the file (nested section)
    assert cfg.train.learning_rate == 0.001  # from the file (flat, seed-style key)
    assert cfg.lora.lora_target_modules == ["q_proj", "k_proj"]
    assert cfg.gkd.beta == 0.9  # the flag wins over the file


@pytest.mark.parametrize(
    "text, suffix",
    [
        ("lora_target_modules: all-linear\n", "yaml"),
        ("lora:\n  lora_target_modules: all-linear\n", "yaml"),
        ('[lora]\nlora_target_modules = "all-linear"\n', "toml"),
    ],
)
def test_a_bare_string_for_a_list_setting_is_its_one_item(tmp_path, text, suffix):
    """As TRL's YAML configs write it, and as the flag `--lora_target_modules all-linear` reads."""
    path = tmp_path / f"run.{suffix}"
    path.write_text(text)
    need = ["--model_name_or_path", "a/b", "--teacher_model_name_or_path", "c/d", "--dataset_name", "e/f"]
    from_file = parse_args(["--config", str(path), *need])[0].lora.lora_target_modules
    assert from_file == parse_args([*need, "--lora_target_modules", "all-linear"])[0].lora.lora_target_modules
    assert from_file == ["all-linear"]


def test_the_demo_config_is_a_valid_learner_config():
    """demo/demo.yaml is read by `make demo` and bench.recipes; a key the config refuses breaks both."""
    from pathlib import Path

    demo = Path(__file__).resolve().parents[1] / "demo" / "demo.yaml"
    cfg = parse_args(["--config", str(demo)])[0]
    assert cfg.lora.use_peft and cfg.lora.lora_target_modules == ["all-linear"]


BAD = [
    (["--lmbda", "1.5"], "lmbda", "[0, 1]"),
    (["--lmbda", "-0.1"], "lmbda", "[0, 1]"),
    (["--beta", "1.01"], "beta", "[0, 1]"),
    (["--beta", "-1"], "beta", "[0, 1]"),
    (["--per_device_train_batch_size", "0"], "per_device_train_batch_size", "positive"),
    (["--gradient_accumulation_steps", "-2"], "gradient_accumulation_steps", "positive"),
    (["--max_steps", "0"], "max_steps", "positive"),
    (["--temperature", "0"], "temperature", "> 0"),
    (["--max_new_tokens", "0"], "max_new_tokens", "positive"),
    (["--lora_r", "0"], "lora_r", "positive"),
    (["--learning_rate=-1e-4"], "learning_rate", "> 0"),
    (["--max_new_tokens", "2048", "--max_length", "1024"], "max_new_tokens", "max_length"),
    (["--rollout_url", "http://x:1"], "rollout_url", "tcp://"),
    (["--transport", "ray", "--rollout_url", "tcp://127.0.0.1:5555"], "transport", "ray://"),
    (["--teacher_device", "gpu7"], "teacher_device", "cuda:N"),
]


@pytest.mark.parametrize("extra,field,allowed", BAD, ids=[f"{b[1]}:{' '.join(b[0])}" for b in BAD])
def test_bad_value_is_one_line_naming_field_and_range_and_exit_2(extra, field, allowed, capsys):
    with pytest.raises(SystemExit) as e:
        main(REQUIRED + extra)
    assert e.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    assert field in lines[0] and allowed in lines[0] and lines[0].startswith("gkd-learner: error:")


def test_every_mistake_gets_its_own_line(capsys):
    with pytest.raises(SystemExit) as e:
        main(REQUIRED + ["--lmbda", "2", "--beta", "3", "--per_device_train_batch_size", "0"])
    assert e.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 3
    assert [ln.split(":")[2].split("=")[0].strip() for ln in lines] == [
        "lmbda",
        "beta",
        "per_device_train_batch_size",
    ]


@pytest.mark.parametrize(
    "argv,needle",
    [
        (REQUIRED + ["--no_such_flag", "1"], "unrecognized arguments: --no_such_flag"),
        (REQUIRED + ["--config", "/nonexistent/run.yaml"], "config='/nonexistent/run.yaml': file not found"),
        (
            ["--model_name_or_path", "a/b", "--dataset_name", "c/d"],
            "teacher_model_name_or_path=None is invalid: must be set",
        ),
        (
            [
                "--model_name_or_path",
                "/nonexistent/student",
                "--teacher_model_name_or_path",
                "a/b",
                "--dataset_name",
                "c/d",
            ],
            "model_name_or_path='/nonexistent/student' does not exist",
        ),
        (
            REQUIRED[:4] + ["--dataset_name", "./missing.jsonl"],
            "dataset_name='./missing.jsonl' does not exist",
        ),
        (REQUIRED + ["--lmbda", "half"], "argument --lmbda: invalid float value"),
        (REQUIRED + ["--eval_strategy", "sometimes"], "invalid choice"),
    ],
    ids=[
        "unknown-flag",
        "missing-config-file",
        "missing-teacher",
        "missing-model-path",
        "missing-dataset",
        "not-a-number",
        "bad-choice",
    ],
)
def test_user_mistakes_exit_2_with_one_line(argv, needle, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0], err


def test_bad_config_file_contents(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("lmbda: [unclosed\n")
    unknown = tmp_path / "unknown.toml"
    unknown.write_text("not_a_setting = 1\n")
    for path, needle in ((bad, "not valid YAML"), (unknown, "not_a_setting: unknown setting")):
        with pytest.raises(SystemExit):
            main(REQUIRED + ["--config", str(path)])
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and needle in err[0], err


def test_wrong_type_in_file_is_one_line(tmp_path):
    path = tmp_path / "t.yaml"
    path.write_text("lmbda: high\n")
    with pytest.raises(ConfigError) as e:
        parse_args(REQUIRED + ["--config", str(path)])
    assert len(e.value.errors) == 1 and "lmbda" in e.value.errors[0]


def test_resolved_config_json_is_written_with_token_redacted(tmp_path, monkeypatch):
    monkeypatch.setenv("GKD_TOKEN", "s3cret")
    cfg, _ = parse_args(REQUIRED + ["--lmbda", "0.3", "--output_dir", str(tmp_path / "out")])
    assert cfg.rollout.token == "s3cret"  # taken from the environment
    path = write_resolved(cfg, cfg.train.output_dir)
    text = path.read_text()
    assert "s3cret" not in text
    data = json.loads(text)
    assert data["rollout"]["token"] == "***" and data["gkd"]["lmbda"] == 0.3
    back = from_json(path)
    assert isinstance(back, Config) and back.gkd.lmbda == 0.3 and back.rollout.token is None


def test_rollout_url_from_environment_lets_the_seed_command_run_unchanged(monkeypatch):
    monkeypatch.setenv("GKD_ROLLOUT_URL", "tcp://10.1.2.3:7000")
    assert parse_args(SEED_COMMAND)[0].rollout.rollout_url == "tcp://10.1.2.3:7000"
    assert (
        parse_args(SEED_COMMAND + ["--rollout_url", "tcp://h:1"])[0].rollout.rollout_url == "tcp://h:1"
    )  # the flag wins


def test_rollout_url_defaults_to_server_host_and_port(monkeypatch):
    monkeypatch.delenv("GKD_ROLLOUT_URL", raising=False)
    cfg, _ = parse_args(REQUIRED + ["--server_host", "10.0.0.2", "--server_port", "6000"])
    assert rollout_url(cfg) == "tcp://10.0.0.2:6000"
    cfg, _ = parse_args(REQUIRED + ["--rollout_url", "ray://gkd-rollout"])
    assert rollout_url(cfg) == "ray://gkd-rollout"
