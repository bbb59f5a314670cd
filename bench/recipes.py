"""`python -m bench.recipes`: which distillation recipe closes the most of the teacher gap in a fixed budget.

Each recipe of the grid trains the embedded default (demo.prepare's teacher and pruned student, the
demo's settings in demo/demo.yaml, the recipe's flags on top) for the same wall-clock budget
(`--max_time_s`: training time, evaluations excluded), with the demo's rollout server beside it
(demo.run.train_stage). For each recipe, on the split evaluated:

- the share of the gap closed: JSD (at beta 0.5 for every recipe, `--eval_beta`) to the teacher on
  its own text, step 0 vs the end (the teacher's JSD to itself is 0);
- the teacher NLL of the student's samples, against the teacher's NLL of its own text;
- distinct-2 of the student's samples, against the teacher text's;
- wall time of the learner, its steps, and the curve (JSD vs training seconds, `curve_steps`).

Honest evaluation: the training prompts are split once (seeded) into `train` and `validation`
(`--val_prompts` of them); the sweep trains on `train` and evaluates on `validation` only, and picks
the winner there. The held-out split is touched only by `--final RECIPE`, one run of the chosen
recipe, reported on its own line. So the held-out figure is never tuned to.

    python -m bench.recipes                       # the sweep (validation split), ~budget x recipes
    python -m bench.recipes --recipes default beta0
    python -m bench.recipes --final beta0.9       # the chosen recipe, once, on the held-out split
    python -m bench.recipes --tiny                # tiny models, seconds-long budgets (the smoke test)

Writes `<out>/recipes.json` (everything measured), `<out>/recipes.md` (the table), the plot
`<plots>/recipes_jsd_vs_time.png` (one curve per recipe) and the section between the recipes markers
in BENCHMARKS.md (appended when missing).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from bench import common

# name -> (what it tests, learner flags on top of demo/demo.yaml). "default" is the demo's recipe:
# beta 0.5, lmbda 0.5, loss temperature = the sampling temperature (0.9), LoRA r64 on all linear layers.
RECIPES: dict[str, tuple[str, list[str]]] = {
    "default": ("the demo's recipe (beta 0.5, lmbda 0.5, loss T = sampling T, LoRA r64)", []),
    "beta0": ("beta 0: forward KL(teacher || student)", ["--beta", "0.0"]),
    "beta0.9": ("beta 0.9: near-reverse KL", ["--beta", "0.9"]),
    "lmbda-linear": (
        "on-policy share ramping 0 -> 1 (teacher text first, own samples later)",
        ["--lmbda", "1.0", "--lmbda_schedule", "linear"],
    ),
    "loss-t1": (
        "loss temperature 1 (TRL's) instead of the sampling temperature",
        ["--loss_temperature", "1.0"],
    ),
    # full fine-tuning moves every weight: at the LoRA learning rate (1e-3) it diverges, so it gets
    # a full-fine-tuning one
    "full-ft": (
        "full fine-tuning instead of LoRA (learning rate 1e-4)",
        ["--use_peft", "false", "--learning_rate", "1.0e-4"],
    ),
    "sampled-rkl": (
        "sampled-token reverse KL on the student's own samples only (lmbda 1)",
        ["--loss_type", "sampled_rkl", "--lmbda", "1.0"],
    ),
    "lr2e-3": ("the default at twice the learning rate (2e-3)", ["--learning_rate", "2.0e-3"]),
    "lmbda0": (
        "teacher text only (lmbda 0: supervised KD, no sampling on the critical path)",
        ["--lmbda", "0.0"],
    ),
}
# In the grid but not swept here, and why (the table lists them).
NOT_SWEPT = {
    "topk-tail": "top-k + tail JSD needs a teacher server (--teacher_url): a third engine beside the rollout "
    "server and the learner on the same 2 cores, which the demo's budget does not hold; its maths and "
    "agreement with the full-vocabulary JSD are tested in tests/test_loss_sparse.py and tests/test_remote_teacher.py"
}
# Every recipe is scored with the JSD at this beta (the demo's figure), whatever beta it trains with:
# the JSD at beta 0 is the forward KL, at 0.9 another divergence, and their "gaps" do not compare.
EVAL_BETA = 0.5

TINY_CONFIG = {
    "torch_dtype": "float32",
    "dataset_train_split": "train",
    "eval_samples": 4,
    "curve_samples": 4,
    "curve_steps": 2,
    "max_length": 128,
    "use_peft": True,
    "lora_r": 8,
    "lora_alpha": 16,
    "lora_dropout": 0.0,
    "learning_rate": 5.0e-3,
    "lr_scheduler_type": "constant",
    "per_device_train_batch_size": 2,
    "gradient_accumulation_steps": 1,
    "max_steps": 1000,
    "logging_steps": 1,
    "eval_strategy": "steps",
    "eval_steps": 100000,
    "save_steps": 100000,
    "seed": 42,
    "lmbda": 0.5,
    "beta": 0.5,
    "temperature": 0.9,
    "max_new_tokens": 16,
    "sync_steps": 2,
    "max_staleness": 2,
    "max_inflight": 2,
    "torch_num_threads": 1,
}


# ---------------------------------------------------------------- data: train / validation / held-out


def _jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def split_data(
    train_rows: list[dict], heldout_rows: list[dict], out: Path, val_prompts: int, seed: int = 0
) -> Path:
    """out/{train,validation,heldout}.jsonl: a seeded `val_prompts` slice of the training rows is the
    validation split (never trained on in the sweep); held-out rows are copied untouched."""
    if not 0 < val_prompts < len(train_rows):
        raise ValueError(f"--val_prompts {val_prompts} must be in (0, {len(train_rows)})")
    order = list(range(len(train_rows)))
    random.Random(f"validation:{seed}").shuffle(order)
    val = set(order[:val_prompts])
    out.mkdir(parents=True, exist_ok=True)
    _write_jsonl(out / "train.jsonl", [r for i, r in enumerate(train_rows) if i not in val])
    _write_jsonl(out / "validation.jsonl", [r for i, r in enumerate(train_rows) if i in val])
    _write_jsonl(out / "heldout.jsonl", heldout_rows)
    (out / "README.md").write_text(
        "---\nconfigs:\n- config_name: default\n  data_files:\n"
        + "".join(f"  - split: {s}\n    path: {s}.jsonl\n" for s in ("train", "validation", "heldout"))
        + "---\nbench.recipes: the demo's training rows split into train and validation; heldout untouched.\n"
    )
    return out


def prepare(args, work: Path) -> SimpleNamespace:
    """Teacher, student, split data and the learner config for this run (tiny or the embedded default)."""
    if args.tiny:
        from shared.tiny import build_pair, write_dataset

        student, teacher = build_pair(work / "models")
        rows = _jsonl(write_dataset(work / "tiny.jsonl", n=40, seed=5))
        train_rows, heldout_rows = rows[:32], rows[32:]
        config = work / "tiny.yaml"
        import yaml

        config.write_text(yaml.safe_dump(TINY_CONFIG))
    else:
        paths = common.demo_paths()
        student, teacher = paths["student"], paths["teacher"]
        train_rows, heldout_rows = (
            _jsonl(paths["data"] / "train.jsonl"),
            _jsonl(paths["data"] / "heldout.jsonl"),
        )
        from demo import run as demo_run

        config = demo_run.CONFIG
    data = split_data(train_rows, heldout_rows, work / "data", args.val_prompts)
    return SimpleNamespace(student=Path(student), teacher=Path(teacher), data=data, config=Path(config))


# ---------------------------------------------------------------- one recipe


def run_recipe(name: str, prep, split: str, budget_s: float, work: Path, extra: list[str]) -> dict[str, Any]:
    """Train under recipe `name` for `budget_s` training seconds; evaluate on `split`; the figures."""
    from demo.run import train_stage
    from learner.metrics import read

    out = work / split / name
    out.mkdir(parents=True, exist_ok=True)
    flags = RECIPES[name][1] + ["--dataset_test_split", split, "--max_time_s", str(budget_s)]
    # the "before" row: the sweep's gap-closed figure is measured against the step-0 evaluation
    flags += ["--eval_beta", str(EVAL_BETA), "--eval_on_start", "true"] + extra
    t0 = time.perf_counter()
    watched = train_stage(out, prep, prep.config, out / "learner", flags, out / "logs")
    wall = time.perf_counter() - t0
    return summarize(name, read(out / "learner"), wall, watched["timings"].get("learner_s", wall), flags)


def summarize(
    name: str, rows: list[dict[str, Any]], wall_s: float, learner_s: float, flags: list[str]
) -> dict[str, Any]:
    """The sweep's figures from one learner's metrics.jsonl rows."""
    from demo.report import curve_points, eval_rows

    evals = eval_rows(rows)
    if len(evals) < 2:
        raise RuntimeError(f"recipe {name}: {len(evals)} evaluation rows; need step 0 and the end")
    b, a = evals[0], evals[-1]
    b_jsd, a_jsd = b["eval/teacher_text/jsd"], a["eval/teacher_text/jsd"]
    t_nll, t_d2 = a.get("eval/teacher_text/teacher_nll"), a.get("eval/teacher_text/distinct2")
    return {
        "recipe": name,
        "what": RECIPES[name][0],
        "flags": flags,
        "steps": a["step"],
        "jsd_before": b_jsd,
        "jsd_after": a_jsd,
        "gap_closed": (b_jsd - a_jsd) / b_jsd if b_jsd > 0 else float("nan"),
        "student_teacher_nll": a.get("eval/student/teacher_nll"),
        "teacher_own_nll": t_nll,
        "nll_ratio": a["eval/student/teacher_nll"] / t_nll if t_nll else float("nan"),
        "distinct2": a.get("eval/student/distinct2"),
        "teacher_distinct2": t_d2,
        "learner_wall_s": round(learner_s, 1),
        "stage_wall_s": round(wall_s, 1),
        "curve": curve_points(rows),
    }


# ---------------------------------------------------------------- report


HEADER = [
    "recipe",
    "steps",
    "JSD before -> after",
    "gap closed",
    "teacher NLL of samples (teacher's own)",
    "distinct-2 (teacher text)",
    "learner wall s",
]


def _row(r: dict[str, Any]) -> list[Any]:
    return [
        f"`{r['recipe']}`",
        r["steps"],
        f"{r['jsd_before']:.3f} -> {r['jsd_after']:.3f}",
        f"{100 * r['gap_closed']:.0f}%",
        f"{r['student_teacher_nll']:.2f} ({r['teacher_own_nll']:.2f}; {r['nll_ratio']:.2f}x)",
        f"{r['distinct2']:.3f} ({r['teacher_distinct2']:.3f})",
        r["learner_wall_s"],
    ]


def render(result: dict[str, Any], plot_name: str) -> str:
    s = result["settings"]
    out = [
        f"Each recipe trained for the configuration's max_steps, stopped early at {s['budget_s']:g} s of training "
        "(evaluation excluded; the steps column says which ended it) on "
        f"{'the tiny test models' if s['tiny'] else 'the embedded default (demo.prepare teacher, pruned student, demo/demo.yaml)'}; "
        f"every recipe is scored by the JSD at beta {EVAL_BETA} on teacher text (whatever beta it trains with); "
        f"the winner is chosen on the **validation** split ({s['val_prompts']} training prompts held back from training).",
        "",
    ]
    if result["sweep"]:
        out += [
            "Validation split (chooses the recipe):",
            "",
            common.table(HEADER, [_row(r) for r in result["sweep"]]),
        ]
        best = max(result["sweep"], key=lambda r: r["gap_closed"])
        out += [
            f"Best on validation: `{best['recipe']}` ({100 * best['gap_closed']:.0f}% of the gap closed).",
            "",
        ]
    for name, why in result["skipped"].items():
        out.append(f"- `{name}` skipped: {why}")
    if result["skipped"]:
        out.append("")
    if result.get("final"):
        f = result["final"]
        out += [
            f"Held-out split, reported once for the final choice `{f['recipe']}`:",
            "",
            common.table(HEADER, [_row(f)]),
        ]
    elif result["sweep"]:
        out.append(
            "The held-out split is not read here: it is reported once, for the recipe chosen, by `make demo` "
            "(demo/demo.yaml holds the choice; the README has its figures)."
        )
        out.append("")
    split = "held-out" if result.get("final") else "validation"
    out += [f"![{split} JSD vs training time, one curve per recipe](bench/plots/{plot_name})", ""]
    return "\n".join(out)


# ---------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.recipes", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--recipes",
        nargs="+",
        default=list(RECIPES),
        help=f"Recipes to sweep (default: all of {list(RECIPES)}).",
    )
    p.add_argument("--final", default=None, help="Run only this recipe, once, on the held-out split.")
    p.add_argument(
        "--budget_s", type=float, default=None, help="Training seconds per recipe (default 300; --tiny 6)."
    )
    p.add_argument(
        "--val_prompts",
        type=int,
        default=None,
        help="Training prompts held back as validation (default 40; --tiny 4).",
    )
    p.add_argument(
        "--tiny", action="store_true", help="Tiny models and seconds-long budgets (the smoke test)."
    )
    p.add_argument("--work", default=None, help="Scratch directory (default: bench/out/recipes-work).")
    p.add_argument("--out", default=str(common.OUT), help="Where recipes.json / recipes.md go.")
    p.add_argument("--plots", default=str(common.PLOTS), help="Where the plot goes.")
    p.add_argument(
        "--benchmarks", default=str(common.ROOT / "BENCHMARKS.md"), help="The BENCHMARKS.md to update."
    )
    p.add_argument(
        "--learner_args", nargs=argparse.REMAINDER, default=[], help="Passed to every learner run."
    )
    return p


def main(argv: list[str] | None = None) -> None:
    common.setup_process()
    # The learner and server it starts must run this checkout's code, also where the installed
    # entry points belong to another checkout (a shared virtual environment).
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(common.ROOT), os.environ.get("PYTHONPATH")]))
    args = build_parser().parse_args(argv)
    args.budget_s = args.budget_s or (6.0 if args.tiny else 300.0)
    args.val_prompts = args.val_prompts or (4 if args.tiny else 40)
    names = [args.final] if args.final else args.recipes
    unknown = [n for n in names if n not in RECIPES]
    if unknown:
        sys.stderr.write(f"bench.recipes: error: unknown recipe(s) {unknown}; choose from {list(RECIPES)}\n")
        raise SystemExit(2)
    work = Path(args.work or common.OUT / "recipes-work")
    out, plots = Path(args.out), Path(args.plots)
    prep = prepare(args, work)
    result: dict[str, Any] = {
        "settings": {
            "tiny": args.tiny,
            "budget_s": args.budget_s,
            "val_prompts": args.val_prompts,
            "config": str(prep.config),
        },
        "sweep": [],
        "skipped": {} if args.final or args.tiny else dict(NOT_SWEPT),
        "final": None,
    }
    # The held-out split only for --final; the sweep never reads it.
    split = "heldout" if args.final else "validation"
    for name in names:
        print(f"bench.recipes: {name} on {split} ({args.budget_s:g} s)", flush=True)
        r = run_recipe(name, prep, split, args.budget_s, work, args.learner_args)
        result["final" if args.final else "sweep"] = r if args.final else result["sweep"] + [r]
    from demo.report import plot_curves

    runs = [result["final"]] if result["final"] else result["sweep"]
    plot_name = "recipes_jsd_vs_time.png" if not args.final else "recipes_final_jsd_vs_time.png"
    plots.mkdir(parents=True, exist_ok=True)
    if runs:
        curves = {r["recipe"]: r["curve"] for r in runs if r["curve"]}
        plot_curves(plots / plot_name, curves, x="train_s", split="held-out" if args.final else "validation")
    md = render(result, plot_name)
    out.mkdir(parents=True, exist_ok=True)
    name = "recipes_final" if args.final else "recipes"
    (out / f"{name}.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    (out / f"{name}.md").write_text(md)
    title = "Distillation recipes" + (": the final choice on held-out" if args.final else "")
    common.write_section(Path(args.benchmarks), md, name, f"{title} (`python -m bench.recipes`)")
    print(md)


if __name__ == "__main__":
    main()
