"""The benchmark harness's own arithmetic: percentiles, targets, curve interpolation, fits, summaries.

The benchmarks themselves are not tests (they take minutes and measure the machine); these check the
small functions that turn their raw figures into the verdicts BENCHMARKS.md prints.
"""

from __future__ import annotations

import math

from bench.common import pct, read_jsonl_complete, target
from bench.end_to_end import interp, pick
from bench.run_all import summary
from bench.scaling import linear_fit


def test_pct_interpolates_and_p95_of_few_samples_is_near_the_max():
    assert pct([1.0, 2.0, 3.0, 4.0, 5.0], 50) == 3.0
    assert pct([1.0, 2.0], 50) == 1.5
    assert math.isclose(pct([1.0, 2.0, 3.0], 95), 2.9)
    assert math.isnan(pct([], 50))


def test_target_met_and_not_met_in_both_directions():
    assert target("speed", 2.5, 2.0)["met"]
    assert not target("speed", 1.5, 2.0)["met"]
    low = target("latency", 0.4, 1.0, higher_is_better=False, unit=" s")
    assert low["met"] and "<= 1 s" in low["line"] and "**met**" in low["line"]
    assert not target("latency", 1.4, 1.0, higher_is_better=False)["met"]
    assert not target("ratio", float("nan"), 2.0)["met"]  # an undefined ratio never counts as met


def test_interp_is_piecewise_linear_and_flat_past_the_end():
    curve = [(0.0, 1.0), (10.0, 0.5), (20.0, 0.25)]
    assert interp(curve, 5.0) == 0.75
    assert interp(curve, 15.0) == 0.375
    assert interp(curve, 99.0) == 0.25


def test_pick_spreads_over_the_budget_and_keeps_the_last():
    snaps = [{"t": float(t), "step": t} for t in range(0, 101, 5)]
    chosen = pick(snaps, 4, 100.0)
    assert [s["t"] for s in chosen] == [25.0, 50.0, 75.0, 100.0]
    assert pick([], 4, 100.0) == []
    assert [s["t"] for s in pick(snaps[:2], 4, 100.0)] == [
        5.0
    ]  # a short run: each grid point maps to its last snapshot


def test_linear_fit_recovers_intercept_and_slope():
    a, b, worst = linear_fit([100, 200, 400], [1.5, 2.5, 4.5])
    assert math.isclose(a, 0.5) and math.isclose(b, 0.01) and worst < 1e-9
    assert math.isnan(linear_fit([5, 5], [1, 2])[0])


def test_read_jsonl_complete_skips_an_unfinished_last_line(tmp_path):
    p = tmp_path / "m.jsonl"
    p.write_text('{"step": 1}\n{"step": 2}\n{"st')
    assert read_jsonl_complete(p) == [{"step": 1}, {"step": 2}]
    assert read_jsonl_complete(tmp_path / "missing.jsonl") == []


def test_summary_lists_targets_and_marks_failed_sections():
    results = {
        "rollout": {"targets": [target("tokens/s ratio", 3.4, 3.0)]},
        "sync": {"failed": True},
        "loss": {"memory_ratio": 0.1, "time_ratio": 1.3},
    }
    text = summary(results)
    assert "tokens/s ratio" in text and "| yes |" in text
    assert "not measured" in text  # sync failed: no numbers, a clear line
    assert "loss time, ours / TRL" in text and "**no**" in text  # 1.3 > 1.0: not met


def test_eval_order_puts_the_start_and_both_end_points_first():
    import argparse

    from bench.end_to_end import eval_order

    ours = [{"t": float(t)} for t in (20, 40, 60, 80, 100)]
    trl = [{"t": float(t)} for t in (30, 60, 90)]
    order = eval_order(ours, trl, argparse.Namespace(points=3, budget_s=100.0))
    assert order[0] == ("start", None)
    assert order[1] == ("ours", ours[-1]) and order[2] == ("trl", trl[-1])
    assert len(order) == 1 + 3 + 3 and len({(s, id(p)) for s, p in order}) == len(order)


def test_teacher_text_jsd_matches_the_learners_divergences(tiny_models, tiny_dataset):
    """The benchmark caches the teacher's logits; the figures must equal learner.evaluate's."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from bench.common import read_rows
    from bench.end_to_end import TeacherTextJSD
    from learner.data import to_examples
    from learner.evaluate import divergences

    tok = AutoTokenizer.from_pretrained(str(tiny_models.student))
    student = AutoModelForCausalLM.from_pretrained(str(tiny_models.student), dtype=torch.float32).eval()
    teacher = AutoModelForCausalLM.from_pretrained(str(tiny_models.teacher), dtype=torch.float32).eval()
    vocab = student.get_output_embeddings().weight.shape[0]
    examples, _ = to_examples(read_rows(tiny_dataset)[:10], "prompt_completion", tok, 200, 256, "skip")
    prompts, comps = [e.prompt_ids for e in examples], [e.completion_ids for e in examples]
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    ours = TeacherTextJSD(teacher, prompts, comps, pad_id=pad, vocab=vocab, beta=0.5, batch_size=4)(student)
    ref = divergences(
        student,
        teacher,
        prompts,
        comps,
        beta=0.5,
        vocab=vocab,
        pad_id=pad,
        max_length=1024,
        batch_size=4,
        device=torch.device("cpu"),
    )
    assert ours["jsd"] > 0
    for k in ("jsd", "kl_fwd", "student_nll"):
        assert math.isclose(ours[k], ref[k], rel_tol=1e-5), k
