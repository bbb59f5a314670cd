"""The held-out curve: cheap evaluation points during training, and the on-policy share's schedule.

A full evaluation (learner.evaluate) samples from the student on the server and scores both the
samples and the teacher text: on the demo's 40 prompts that is ~95 s, too dear to repeat during a
15-minute run. A curve point scores only the teacher-written text of a fixed subset (the first
`curve_samples` eval prompts): two forward passes, no sampling, and the teacher text is the dataset's
(or generated once and cached by the recipe). The teacher's JSD to itself is 0, so the share of the
gap closed at a point is 1 - jsd / jsd at step 0, on the same prompts.

Rows logged: `curve/teacher_text/{jsd,kl_fwd,kl_rev,student_nll}` (the divergences named with the
teacher server's suffix, e.g. `jsd_top20_tail`, against a `--teacher_url` teacher) with `curve/train_s`, the seconds
of training so far with the curve points' own time taken out (what a wall-clock budget buys).
"""

from __future__ import annotations

CURVE_KEYS = ("jsd", "kl_fwd", "kl_rev", "student_nll")


def lmbda_at(lmbda: float, schedule: str, local: int, total_local: int) -> float:
    """The on-policy probability for local micro-batch `local` of `total_local`.

    constant: lmbda throughout. linear: 0 at the first micro-batch, lmbda at the last (teacher text
    while the student is still poor, its own samples once they are worth learning from).
    """
    if schedule == "constant" or total_local <= 1:
        return lmbda
    if schedule == "linear":
        return lmbda * min(1.0, max(0, local) / (total_local - 1))
    raise ValueError(f"unknown lmbda_schedule {schedule!r}")


def curve_due(step: int, every: int | None, total_steps: int) -> bool:
    """Step 0, every `every` steps, and the last step (None: never)."""
    return every is not None and (step == 0 or step % every == 0 or step == total_steps)


def curve_point(
    student,
    teacher,
    prompts: list[list[int]],
    teacher_completions: list[list[int]],
    **kw,
) -> dict[str, float]:
    """`curve/teacher_text/*` on the given (prompt, teacher completion) pairs; kw as `divergences`."""
    from learner.evaluate import divergences  # torch: lmbda_at stays importable without it

    d = divergences(student, teacher, prompts, teacher_completions, **kw)
    sfx = getattr(teacher, "metric_suffix", "")  # top-k + tail bounds against a teacher server
    return {f"curve/teacher_text/{k}{sfx if k != 'student_nll' else ''}": d[k] for k in CURVE_KEYS if k in d}
