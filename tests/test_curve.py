"""The held-out curve (learner.curve, curve_steps) and the lmbda schedule; the demo report's curve.

Fast tests: the schedule and the due-steps as functions, the new flags' validation, and the report's
curve table and plot built from learner-shaped rows. Slow tests: the learner on the tiny models logs
>= 4 curve points with a falling JSD, follows the linear lmbda schedule, and stops at max_time_s.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import learner_flags

from demo import report
from learner.curve import curve_due, lmbda_at
from learner.rollouts import is_on_policy
from shared.config import parse_args

REQUIRED = [
    "--model_name_or_path",
    "Qwen/Qwen2-0.5B-Instruct",
    "--teacher_model_name_or_path",
    "Qwen/Qwen2-1.5B-Instruct",
    "--dataset_name",
    "trl-lib/chatbot_arena_completions",
]


def test_linear_lmbda_ramps_from_zero_to_lmbda():
    total = 11
    ps = [lmbda_at(0.8, "linear", i, total) for i in range(total)]
    assert ps[0] == 0.0 and ps[-1] == pytest.approx(0.8)
    assert all(a < b for a, b in zip(ps, ps[1:]))
    assert ps[5] == pytest.approx(0.4)
    assert lmbda_at(0.8, "linear", 50, total) == pytest.approx(0.8)  # past the end: stays at lmbda


def test_constant_lmbda_is_lmbda_everywhere():
    assert {lmbda_at(0.5, "constant", i, 10) for i in range(10)} == {0.5}


def test_linear_schedule_draws_fewer_on_policy_batches_early():
    total = 400
    on = [is_on_policy(42, i, lmbda_at(1.0, "linear", i, total)) for i in range(total)]
    first, last = sum(on[:100]), sum(on[-100:])
    assert first < 25 < 75 < last, (first, last)


def test_curve_is_due_at_start_every_n_and_at_the_end():
    assert [s for s in range(0, 31) if curve_due(s, 6, 30)] == [0, 6, 12, 18, 24, 30]
    assert [s for s in range(0, 16) if curve_due(s, 6, 15)] == [0, 6, 12, 15]
    assert not any(curve_due(s, None, 30) for s in range(31))


def test_new_flags_parse_into_the_typed_config():
    cfg = parse_args(
        REQUIRED
        + ["--curve_steps", "5", "--curve_samples", "8", "--max_time_s", "60", "--lmbda_schedule", "linear"]
        + ["--eval_beta", "0.5", "--beta", "0.9"]
    )[0]
    assert (cfg.gkd.eval_beta, cfg.gkd.beta) == (0.5, 0.9)
    assert (cfg.train.curve_steps, cfg.data.curve_samples, cfg.train.max_time_s) == (5, 8, 60.0)
    assert cfg.gkd.lmbda_schedule == "linear"
    assert parse_args(REQUIRED)[0].gkd.lmbda_schedule == "constant"


@pytest.mark.parametrize(
    "extra,field",
    [
        (["--curve_steps", "0"], "curve_steps"),
        (["--curve_samples", "0"], "curve_samples"),
        (["--max_time_s", "0"], "max_time_s"),
        (["--lmbda_schedule", "cosine"], "lmbda_schedule"),
        (["--eval_beta", "1.5"], "eval_beta"),
    ],
)
def test_bad_curve_and_schedule_values_exit_2_in_one_line(extra, field, capsys):
    from learner.cli import main

    with pytest.raises(SystemExit) as e:
        main(REQUIRED + extra)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and field in err[0], err


def _rows(jsds: list[float], every: int = 5) -> list[dict]:
    """Learner metrics rows as recipe.curve_if_due writes them, with train and eval rows between."""
    rows = []
    for i, j in enumerate(jsds):
        rows.append({"step": i * every, "loss": 0.1, "seconds_per_step": 1.0})
        rows.append(
            {"step": i * every, "curve/teacher_text/jsd": j, "curve/train_s": 10.0 * i, "curve/samples": 4}
        )
    rows.append({"step": 0, "eval/teacher_text/jsd": jsds[0]})
    return rows


def test_curve_points_give_the_share_of_the_gap_closed():
    pts = report.curve_points(_rows([0.4, 0.3, 0.2, 0.1]))
    assert [p["step"] for p in pts] == [0, 5, 10, 15]
    assert [round(p["closed"], 3) for p in pts] == [0.0, 0.25, 0.5, 0.75]
    assert [p["train_s"] for p in pts] == [0.0, 10.0, 20.0, 30.0]


def test_report_section_and_plot_show_the_curve(tmp_path: Path):
    rows = _rows([0.4, 0.3, 0.25, 0.2, 0.18])
    lines = report.curve_section(rows, 16)
    table = [line for line in lines if line.startswith("| ") and not line.startswith(("| step", "| ---"))]
    assert len(table) == 5 and table[-1].endswith("| 55% |"), lines
    png = report.plot_curves(tmp_path / "curve.png", {"a": report.curve_points(rows)}, x="train_s")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    assert report.curve_section([r for r in rows if "loss" in r], 16) == []


# ---------------------------------------------------------------- the learner, tiny models


@pytest.fixture
def server(server_pool):
    return server_pool.get(fresh=False, max_lora_rank=64)


def _argv(tiny_models, data, out, url, *extra):
    # full fine-tuning (TRL's default) at TRL's learning rate, unless a test says otherwise
    flags = [
        "--use_peft",
        "false",
        "--learning_rate",
        "2e-5",
        "--torch_num_threads",
        "1",
        "--save_steps",
        "1000",
    ]
    return learner_flags(tiny_models, data, out, url, *flags, *extra)


@pytest.mark.slow
def test_learner_logs_a_falling_curve_and_follows_the_linear_schedule(tiny_models, tmp_path, server):
    from learner.metrics import read
    from learner.recipe import run
    from shared.tiny import write_dataset

    data = write_dataset(tmp_path / "small.jsonl", n=16, seed=3)
    out = tmp_path / "run"
    argv = _argv(tiny_models, data, out, server.url, "--max_steps", "12", "--learning_rate", "5e-3")
    argv += ["--curve_steps", "4", "--curve_samples", "4", "--eval_samples", "6"]
    argv += ["--lmbda", "1.0", "--lmbda_schedule", "linear"]
    run(parse_args(argv)[0])
    rows = read(out)
    pts = report.curve_points(rows)
    assert [p["step"] for p in pts] == [0, 4, 8, 12], pts
    assert all(r.get("curve/samples") == 4 for r in report.curve_rows(rows))
    assert pts[-1]["jsd"] < 0.8 * pts[0]["jsd"], pts
    assert [p["train_s"] for p in pts] == sorted(p["train_s"] for p in pts) and pts[-1]["train_s"] > 0
    assert not any("eval/teacher_text/jsd" in r for r in rows)  # curve only: no full evaluation ran
    # linear 0 -> 1 over 24 micro-batches (2 per step): the first step is off-policy, the last on-policy
    train = [r for r in rows if "on_policy_fraction" in r]
    assert train[0]["on_policy_fraction"] == 0.0 and train[-1]["on_policy_fraction"] == 1.0, train


@pytest.mark.slow
def test_max_time_s_stops_early_with_a_final_curve_point_and_evaluation(tiny_models, tmp_path, server):
    from learner.metrics import read
    from learner.recipe import run
    from shared.tiny import write_dataset

    data = write_dataset(tmp_path / "small.jsonl", n=16, seed=4)
    out = tmp_path / "run"
    argv = _argv(tiny_models, data, out, server.url, "--max_steps", "1000", "--max_time_s", "4")
    argv += ["--curve_steps", "500", "--curve_samples", "4", "--eval_samples", "4", "--eval_on_start"]
    argv += ["--eval_strategy", "steps", "--eval_steps", "1000"]
    run(parse_args(argv)[0])
    rows = read(out)
    last = max(r["step"] for r in rows)
    assert 0 < last < 1000
    pts = report.curve_points(rows)
    assert [p["step"] for p in pts] == [0, last], pts
    assert pts[-1]["train_s"] >= 4.0
    evals = [r for r in rows if "eval/teacher_text/jsd" in r]
    assert [r["step"] for r in evals] == [0, last]
    assert evals[-1]["eval/teacher_text/teacher_nll"] > 0  # the teacher's own reference figure
    assert (out / "adapter_model.safetensors").exists() or any(out.glob("**/adapter_model.safetensors"))
