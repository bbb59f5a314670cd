"""Every TRL flag (the installed trl's ScriptArguments, GKDConfig with its TrainingArguments base,
ModelConfig) is accepted under its own name and is implemented, no-effect (one warning) or refused
(`--FLAG: not supported by gkd-service: REASON`, exit 2). A flag a new TRL release adds fails here."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from shared import trl_flags
from shared.config import ConfigError, field_index, parse_args

REQUIRED = [
    *("--model_name_or_path", "Qwen/Qwen2-0.5B-Instruct"),
    *("--teacher_model_name_or_path", "Qwen/Qwen2-1.5B-Instruct"),
    *("--dataset_name", "trl-lib/chatbot_arena_completions"),
]
REPO = Path(__file__).resolve().parents[1]


def _trl_fields() -> list[tuple[str, dataclasses.Field]]:
    import trl

    try:
        from trl import GKDConfig
    except ImportError:  # trl >= 0.2x keeps GKD under experimental
        from trl.experimental.gkd import GKDConfig
    out = []
    for cls in (trl.ScriptArguments, GKDConfig, trl.ModelConfig):
        out += [(cls.__name__, f) for f in dataclasses.fields(cls) if f.init]
    return out


FIELDS = _trl_fields()
OURS = field_index()


def _kind(name: str) -> str:
    if name in OURS:
        return "implemented"
    if name in trl_flags.ALIASES:
        return "alias"
    if name in trl_flags.NO_EFFECT:
        return "no_effect"
    if name in trl_flags.REFUSED:
        return "refused"
    return "unclassified"


def test_every_trl_field_is_classified():
    missing = [f"{cls}.{f.name}" for cls, f in FIELDS if _kind(f.name) == "unclassified"]
    assert not missing, (
        f"TRL flags gkd-service does not classify (add them to shared/trl_flags.py): {missing}"
    )
    assert len(FIELDS) > 150  # the three dataclasses really were enumerated
    # one class per name: the table never shadows a field of the config tree
    assert not (trl_flags.names() & set(OURS))


def _cli_value(default) -> list[str] | None:
    """TRL's default as command-line words (None: nothing sensible to pass)."""
    if default is dataclasses.MISSING or default is None:
        return None
    if isinstance(default, bool):
        return [str(default)]  # "True" / "False": HfArgumentParser's spelling
    if isinstance(default, (list, tuple)):
        return [str(x) for x in default] or None
    return [str(getattr(default, "value", default))]


@pytest.mark.parametrize("cls,field", FIELDS, ids=[f"{c}.{f.name}" for c, f in FIELDS])
def test_each_trl_flag_behaves_per_its_class(cls, field):
    name, kind = field.name, _kind(field.name)
    value = _cli_value(field.default)
    if kind in ("implemented", "alias"):
        if value is None:
            return  # a None default (e.g. --output_dir): implemented, no TRL value to round-trip
        cfg, ns = parse_args(REQUIRED + [f"--{name}", *value])
        ours = OURS[trl_flags.ALIASES.get(name, name)]
        got = getattr(getattr(cfg, ours[0]), trl_flags.ALIASES.get(name, name))
        want = field.default
        if isinstance(got, list):
            assert got == [str(x) for x in (want if isinstance(want, list) else [want])], (name, got, want)
        else:
            assert str(got).lower() == str(getattr(want, "value", want)).lower() or got == want, (
                name,
                got,
                want,
            )
        assert ns.trl_no_effect == []
    elif kind == "no_effect":
        _, ns = parse_args(REQUIRED + [f"--{name}", *(value or ["1"])])
        assert len(ns.trl_no_effect) == 1 and ns.trl_no_effect[0].startswith(f"--{name} (")
    else:  # refused: TRL's default passes, anything else is the one line
        if value is not None:
            parse_args(REQUIRED + [f"--{name}", *value])
        bad = "true" if field.type in (bool, "bool") or field.default is False else "something"
        with pytest.raises(ConfigError) as e:
            parse_args(REQUIRED + [f"--{name}", bad])
        assert e.value.errors == [f"--{name}: not supported by gkd-service: {trl_flags.REFUSED[name]}"]


@pytest.mark.parametrize(
    "words,want",
    [([], True), (["true"], True), (["True"], True), (["False"], False), (["false"], False), (["1"], True)],
)
def test_boolean_flags_take_trl_forms(words, want):
    cfg, _ = parse_args(REQUIRED + ["--bf16", *words, "--use_peft", *words])
    assert cfg.train.bf16 is want and cfg.lora.use_peft is want


def test_trl_names_map_to_ours():
    cfg, _ = parse_args(
        REQUIRED
        + [
            "--dtype",
            "bfloat16",
            "--use_cpu",
            "--warmup_steps",
            "0.1",
            "--lr_scheduler_kwargs",
            '{"num_cycles": 2}',
        ]
        + ["--report_to", "tensorboard", "--optim", "adamw_torch", "--adam_beta1", "0.8", "--use_rslora"]
    )
    assert cfg.model.torch_dtype == "bfloat16" and cfg.model.device == "cpu"
    assert (cfg.train.warmup_steps, cfg.train.report_to, cfg.train.optim, cfg.train.adam_beta1) == (
        0.1,
        ["tensorboard"],
        "adamw_torch",
        0.8,
    )
    assert cfg.lora.use_rslora is True
    from shared.config import scheduler_kwargs, warmup_steps

    assert scheduler_kwargs(cfg) == {"num_cycles": 2} and warmup_steps(cfg, 30) == 3


@pytest.mark.parametrize(
    "argv,line",
    [
        (["--optim", "adafactor"], "--optim: not supported by gkd-service: 'adafactor'"),
        (["--lora_task_type", "SEQ_CLS"], "--lora_task_type: not supported by gkd-service: 'SEQ_CLS'"),
        (["--report_to", "comet_ml"], "report_to='comet_ml' is invalid"),
        (["--bf16", "--fp16"], "bf16 and fp16 are both set"),
        (["--load_in_4bit"], "--load_in_4bit needs --use_peft"),
        (["--lr_scheduler_kwargs", "{oops"], "lr_scheduler_kwargs='{oops' is invalid: not JSON"),
    ],
)
def test_trl_values_we_cannot_honour_are_one_line(argv, line):
    with pytest.raises(ConfigError) as e:
        parse_args(REQUIRED + argv)
    assert len(e.value.errors) == 1 and e.value.errors[0].startswith(line), e.value.errors


def test_trl_keys_in_a_config_file(tmp_path):
    f = tmp_path / "run.yaml"
    f.write_text("dtype: bfloat16\ndataloader_num_workers: 4\nbf16: true\n")
    cfg, ns = parse_args(REQUIRED + ["--config", str(f)])
    assert cfg.model.torch_dtype == "bfloat16" and cfg.train.bf16 is True
    assert [w.split(" ")[0] for w in ns.trl_no_effect] == ["--dataloader_num_workers"]
    f.write_text("deepspeed: ds.json\n")
    with pytest.raises(ConfigError) as e:
        parse_args(REQUIRED + ["--config", str(f)])
    assert e.value.errors[0].startswith("--deepspeed: not supported by gkd-service: ")


def test_single_segment_hub_ids_are_hub_ids():
    cfg, _ = parse_args(
        ["--model_name_or_path", "gpt2", "--teacher_model_name_or_path", "gpt2-medium"] + REQUIRED[4:]
    )
    assert cfg.model.model_name_or_path == "gpt2"
    with pytest.raises(ConfigError) as e:  # a path-like name that does not exist is still refused
        parse_args(
            ["--model_name_or_path", "./nowhere", "--teacher_model_name_or_path", "gpt2"] + REQUIRED[4:]
        )
    assert "model_name_or_path='./nowhere' does not exist" in e.value.errors[0]


def test_help_groups_trl_flags_at_the_end():
    out = subprocess.run(
        [sys.executable, "-m", "learner", "--help"], capture_output=True, text=True, cwd=REPO, timeout=60
    ).stdout
    groups = [
        line.rstrip(":")
        for line in out.splitlines()
        if line and not line.startswith(" ") and line.endswith(":")
    ]
    assert groups[-2:] == ["TRL flags accepted with no effect here", "TRL flags refused here"], groups
    assert out.index("--dataloader_num_workers") > out.index("--lmbda") and "--deepspeed" in out


@pytest.mark.slow
def test_cli_refusal_and_warning_lines(tmp_path, tiny_models):
    """Exit 2 with the one line for a refused flag; one warning line listing the no-effect ones."""
    env_cmd = [sys.executable, "-m", "learner", *REQUIRED]
    r = subprocess.run(
        env_cmd + ["--deepspeed", "ds.json"], capture_output=True, text=True, cwd=REPO, timeout=60
    )
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        f"gkd-learner: error: --deepspeed: not supported by gkd-service: {trl_flags.REFUSED['deepspeed']}"
    ]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "no prompt column"}\n')
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "learner",
            *REQUIRED[:4],
            "--dataset_name",
            str(bad),
            "--output_dir",
            str(tmp_path / "o"),
        ]
        + ["--dataloader_num_workers", "4", "--use_liger_kernel", "--rollout_url", "tcp://127.0.0.1:9"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    lines = [x for x in r.stderr.splitlines() if x.startswith("gkd-learner:")]
    assert r.returncode == 2
    assert lines[0].startswith(
        "gkd-learner: warning: these TRL flags have no effect here: --dataloader_num_workers ("
    )
    assert "--use_liger_kernel (" in lines[0]


def _default_cell(cell: str):
    """`default `X`...` -> X as a Python value (None when the cell states no default)."""
    import re

    m = re.match(r"default `([^`]*)`", cell.strip())
    if m is None:
        return None
    word = m.group(1)
    return {"true": True, "false": False, "None": None}.get(word, word)


def _same(doc, value) -> bool:
    if isinstance(value, list):
        value = value[0] if len(value) == 1 else value
    if isinstance(doc, bool) or doc is None:
        return value is doc
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(doc) == float(value)
    return str(getattr(value, "value", value)) == doc


def test_differences_table_matches_the_code():
    from shared.config import Config

    text = (REPO / "docs" / "differences-from-trl.md").read_text()
    rows = [line.split("|")[1:-1] for line in text.splitlines() if line.startswith("| `--")]
    trl = {f.name: f for _, f in FIELDS}
    cfg = Config()
    checked = 0
    for first, ours_cell, trl_cell in rows:
        names = [n.strip().strip("`").removeprefix("--") for n in first.split(",")]
        for name in names:
            assert name in OURS or name in trl, f"the table names --{name}, which is no flag"
        if len(names) != 1:
            continue
        name = names[0]
        if (doc := _default_cell(ours_cell)) is not None or "default `None`" in ours_cell:
            section = OURS[name][0]
            assert _same(doc, getattr(getattr(cfg, section), name)), (name, doc)
            checked += 1
        if (doc := _default_cell(trl_cell)) is not None or "default `None`" in trl_cell:
            f = trl[name]
            value = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            assert _same(doc, value), (name, doc, value)
            checked += 1
    assert checked >= 8


@pytest.mark.parametrize(
    "argv,line",
    [
        (
            ["--use_peft", "--load_in_4bit"],
            "--load_in_4bit: not supported on device cpu: bitsandbytes quantization needs a CUDA device",
        ),
        (
            ["--use_peft", "--load_in_8bit"],
            "--load_in_8bit: not supported on device cpu: bitsandbytes quantization needs a CUDA device",
        ),
        (["--fp16"], "--fp16: not supported on device cpu: fp16 mixed precision needs CUDA"),
    ],
)
def test_device_refusals_name_the_device(argv, line):
    import torch

    from learner.errors import UserError
    from learner.trl_runtime import check

    cfg, _ = parse_args(REQUIRED + argv)
    with pytest.raises(UserError) as e:
        check(cfg, torch.device("cpu"))
    assert str(e.value).startswith(line) and "\n" not in str(e.value)


@pytest.mark.parametrize("name", ["wandb", "trackio"])
def test_report_to_an_uninstalled_integration_is_one_line(name):
    import importlib.util

    import torch

    from learner.errors import UserError
    from learner.trl_runtime import check, reporters

    cfg, _ = parse_args(REQUIRED + ["--report_to", name, "tensorboard"])
    if importlib.util.find_spec(name) is not None:
        check(cfg, torch.device("cpu"))  # installed: accepted
        assert reporters(cfg) == [name, "tensorboard"]
        return
    with pytest.raises(UserError) as e:
        check(cfg, torch.device("cpu"))
    assert str(e.value).startswith(f"--report_to {name}: the {name} package is not installed")


@pytest.mark.parametrize(
    ("flags", "want"),
    [
        (["--report_to", "none"], []),  # metrics.jsonl only: no TensorBoard writer
        (["--report_to", "tensorboard"], ["tensorboard"]),
        (["--report_to", "tensorboard", "none", "tensorboard"], ["tensorboard"]),
    ],
)
def test_report_to_none_writes_no_integration(flags, want):
    from learner.trl_runtime import reporters

    cfg, _ = parse_args(REQUIRED + flags)
    assert reporters(cfg) == want


@pytest.mark.slow
def test_load_in_4bit_on_cpu_exits_2_with_one_line(tmp_path, tiny_models, tiny_dataset):
    """QLoRA here (CPU, no bitsandbytes device): exit 2, one line naming the device, within seconds,
    before any server is waited for."""
    import time

    t0 = time.monotonic()
    r = subprocess.run(
        [sys.executable, "-m", "learner", "--model_name_or_path", str(tiny_models.student)]
        + ["--teacher_model_name_or_path", str(tiny_models.teacher), "--dataset_name", str(tiny_dataset)]
        + ["--output_dir", str(tmp_path / "o"), "--use_peft", "--load_in_4bit", "--device", "cpu"]
        + ["--rollout_url", "tcp://127.0.0.1:9"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert r.returncode == 2
    lines = [x for x in r.stderr.splitlines() if x.startswith("gkd-learner:")]
    assert lines == [
        "gkd-learner: error: --load_in_4bit: not supported on device cpu: bitsandbytes quantization needs a CUDA "
        "device (train the LoRA on the unquantized student instead: drop the flag)"
    ]
    assert time.monotonic() - t0 < 60
    assert not (tmp_path / "o").exists()
