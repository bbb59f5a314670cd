"""bench.recipes: the data split that keeps the held-out honest, the BENCHMARKS.md section, and the
sweep end to end on tiny models (two recipes, seconds-long budgets)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench import recipes

REPO = Path(__file__).resolve().parent.parent


def test_validation_is_carved_from_training_rows_and_heldout_is_untouched(tmp_path):
    train = [{"prompt": f"p{i}", "completion": "c"} for i in range(20)]
    held = [{"prompt": f"h{i}", "completion": "c"} for i in range(5)]
    d = recipes.split_data(train, held, tmp_path / "d", val_prompts=4)
    read = lambda s: [json.loads(x)["prompt"] for x in (d / f"{s}.jsonl").read_text().splitlines()]  # noqa: E731
    tr, val, ho = read("train"), read("validation"), read("heldout")
    assert len(val) == 4 and len(tr) == 16 and not set(tr) & set(val)
    assert set(tr) | set(val) == {r["prompt"] for r in train} and ho == [r["prompt"] for r in held]
    assert (
        recipes.split_data(train, held, tmp_path / "e", val_prompts=4) and read("validation") == val
    )  # seeded
    with pytest.raises(ValueError):
        recipes.split_data(train, held, tmp_path / "f", val_prompts=20)


def test_benchmarks_section_is_replaced_not_duplicated_and_make_bench_keeps_it(tmp_path):
    from bench.common import standalone_sections, write_section

    md = tmp_path / "BENCHMARKS.md"
    md.write_text("# Benchmarks\n\nother section\n")
    write_section(md, "table one", "recipes", "Recipes")
    write_section(md, "table two", "recipes", "Recipes")
    write_section(md, "final table", "recipes_final", "Final")
    text = md.read_text()
    assert text.startswith("# Benchmarks\n\nother section\n")
    assert "table two" in text and "table one" not in text and text.count("bench.recipes:start") == 1
    assert "final table" in text
    write_section(md, "## Its own heading\n\nbody", "headed", "Headed")  # one heading: the title
    assert "## Headed\n" in md.read_text() and "Its own heading" not in md.read_text()
    text = md.read_text()
    # what bench.run_all carries over when it rewrites the rest: both sections, whole, in order
    kept = standalone_sections(text)
    assert [k.splitlines()[0] for k in kept] == [
        "<!-- bench.recipes:start -->",
        "<!-- bench.recipes_final:start -->",
        "<!-- bench.headed:start -->",
    ]
    assert "table two" in kept[0] and kept[1].rstrip().endswith("<!-- bench.recipes_final:end -->")


def test_grid_covers_the_issue():
    flags = {n: " ".join(f) for n, (_, f) in recipes.RECIPES.items()}
    assert {"--beta 0.0", "--beta 0.9"} <= set(flags.values()) and flags["default"] == ""
    assert "--lmbda_schedule linear" in flags["lmbda-linear"] and "--loss_temperature 1.0" in flags["loss-t1"]
    assert flags["full-ft"].startswith("--use_peft false")
    assert (
        flags["sampled-rkl"] == "--loss_type sampled_rkl --lmbda 1.0"
    )  # the config refuses it below lmbda 1
    assert set(recipes.NOT_SWEPT) == {"topk-tail"} and not set(recipes.NOT_SWEPT) & set(recipes.RECIPES)


@pytest.mark.slow
def test_tiny_sweep_of_two_recipes_writes_table_plot_and_section(tmp_path):
    bench_md = tmp_path / "BENCHMARKS.md"
    cmd = [sys.executable, "-m", "bench.recipes", "--tiny", "--recipes", "default", "beta0"]
    cmd += ["--budget_s", "5", "--work", str(tmp_path / "work"), "--out", str(tmp_path / "out")]
    cmd += ["--plots", str(tmp_path / "plots"), "--benchmarks", str(bench_md)]
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "VLLM_CPU_KVCACHE_SPACE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=1200)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    result = json.loads((tmp_path / "out" / "recipes.json").read_text())
    assert [r["recipe"] for r in result["sweep"]] == ["default", "beta0"] and result["final"] is None
    for r in result["sweep"]:
        assert r["steps"] > 0 and r["learner_wall_s"] > 5
        assert len(r["curve"]) >= 2 and r["curve"][-1]["train_s"] >= 5
        assert r["jsd_before"] > 0 and r["teacher_own_nll"] > 0 and 0 < r["distinct2"] <= 1
        pairs = [" ".join(r["flags"][i : i + 2]) for i in range(len(r["flags"]))]
        assert "--dataset_test_split validation" in pairs and "--eval_beta 0.5" in pairs
    table = (tmp_path / "out" / "recipes.md").read_text()
    assert "| `default` |" in table and "| `beta0` |" in table and "validation" in table
    png = tmp_path / "plots" / "recipes_jsd_vs_time.png"
    assert png.read_bytes()[:4] == b"\x89PNG"
    assert "bench.recipes:start" in bench_md.read_text() and "| `beta0` |" in bench_md.read_text()
