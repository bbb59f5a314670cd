"""The teacher behind one small interface, so the recipe does not care where it runs.

- `LocalTeacher`: a HF model in this process (the default, `--teacher_model_name_or_path`): its
  full logits for the loss, HF generate for teacher-written completions.
- `RemoteTeacher`: one or more teacher servers (`gkd-rollout-server --role teacher`, given as
  `--teacher_url`, several comma-separated as a least-loaded replica set): per completion position
  the teacher's top-k ids and log-probs and the actual token's log-prob (temperature 1), for the
  top-k + tail JSD or the sampled reverse KL; teacher-written completions are sampled by that
  server. No teacher weights are loaded here.

Both have the same shape: `submit(prompts, completions, max_length)` starts scoring one batch (a
remote teacher sends it at once and returns; a local one does nothing yet) and `collect(pending,
batch)` returns its `TeacherTargets`, so the recipe can send the next batch for scoring before it
trains on the current one. `open_remote` checks each teacher server before anything heavy loads:
it must be a teacher, tokenize exactly like the student (shared.vocab fingerprint), and accept the
top-k asked for.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from learner.errors import UserError
from learner.rollouts import hf_generate
from learner.step import Batch, TeacherTargets, completion_logits, fit_completions
from shared.messages import GenerateRequest, Prompt, SamplingSpec, ScoreRequest, ScoreSequence
from shared.transport.base import RemoteError, ServerUnavailable

log = logging.getLogger("gkd.learner")


class LocalTeacher:
    """A teacher model in this process; `collect` runs its forward (no grad) on the batch."""

    remote = False
    metric_suffix = ""  # its figures are full-vocabulary ones

    def __init__(
        self, model: Any, device: torch.device, *, vocab: int, pad_id: int = 0, eos_id: int | list[int] = 0
    ):
        self.model, self.device, self.vocab = model, device, vocab
        self.pad_id, self.eos_id = pad_id, eos_id

    def submit(
        self, prompts: list[list[int]], completions: list[list[int]], max_length: int, *, train: bool = False
    ) -> None:
        return None  # the forward runs in collect, on the batch itself

    @torch.no_grad()
    def collect(self, pending: None, batch: Batch) -> TeacherTargets:
        out = batch.labels.device
        tb = batch if self.device == out else batch.to(self.device)
        return TeacherTargets(logits=completion_logits(self.model, tb, self.vocab).to(out))

    def generate(
        self, prompts: list[list[int]], *, temperature: float, max_new_tokens: int, seed: int
    ) -> list[list[int]]:
        return hf_generate(
            self.model,
            prompts,
            pad_id=self.pad_id,
            eos_id=self.eos_id,
            temperature=temperature,
            max_new_tokens=max_new_tokens,
            device=self.device,
            seed=seed,
        )

    def close(self) -> None:
        pass


# What MemoTeacher may keep: the demo's 40 evaluation prompts x <= 64 teacher tokens x a 49152-token
# vocabulary in fp32 are ~0.5 GB of logits; a larger evaluation set just stops being memoized.
MEMO_BYTES = 1 << 30


class MemoTeacher:
    """A teacher whose targets on fixed text are computed once: the teacher and its own written text
    do not change during training, so every evaluation and curve point would repeat the same forward.

    Keyed by the exact batch (prompts, completions, max_length): the evaluation and the curve batch
    the same prompts the same way, so a hit returns exactly what the teacher computed. Entries are
    kept until `max_bytes` of targets are held; past that, batches are scored as usual.
    """

    def __init__(self, teacher: Any, max_bytes: int = MEMO_BYTES):
        self.teacher, self.max_bytes, self.held_bytes = teacher, max_bytes, 0
        self.remote, self.metric_suffix = teacher.remote, teacher.metric_suffix
        self._memo: dict[tuple, TeacherTargets] = {}

    def submit(self, prompts: list[list[int]], completions: list[list[int]], max_length: int) -> Any:
        key = (tuple(map(tuple, prompts)), tuple(map(tuple, completions)), max_length)
        if key in self._memo:
            return key, None
        return key, self.teacher.submit(prompts, completions, max_length)

    def collect(self, pending: Any, batch: Batch) -> TeacherTargets:
        key, inner = pending
        if key in self._memo:
            return self._memo[key]
        targets = self.teacher.collect(inner, batch)
        size = sum(t.numel() * t.element_size() for t in vars(targets).values() if t is not None)
        if self.held_bytes + size <= self.max_bytes:
            self._memo[key], self.held_bytes = targets, self.held_bytes + size
        return targets


@dataclass
class Scoring:
    """One batch sent to the teacher server(s) and not yet collected."""

    req: ScoreRequest  # what was sent (resent under a new id if the server drops)
    rows: list[int]  # batch row of each sequence in req (rows without a completion token are not sent)


class RemoteTeacher:
    """Teacher server(s) behind one RolloutClient (a ReplicaSet for several URLs)."""

    remote = True

    def __init__(
        self,
        client: Any,
        url: str,
        *,
        k: int,
        train_k: int,
        vocab: int,
        fingerprint: str,
        timeout_s: float,
        deadline_s: float,
    ):
        self.client, self.url, self.k, self.train_k, self.vocab = client, url, k, train_k, vocab
        self.fingerprint, self.timeout_s, self.deadline_s = fingerprint, timeout_s, deadline_s
        self.metric_suffix = f"_top{k}_tail"  # never to be confused with full-vocabulary figures
        self.positions = 0  # completion positions scored so far
        self.wait_s = 0.0  # time blocked waiting for scores

    def submit(
        self, prompts: list[list[int]], completions: list[list[int]], max_length: int, *, train: bool = False
    ) -> Scoring:
        """Send the batch for scoring (returns at once): top train_k for the loss (train), else the
        evaluation's --teacher_topk."""
        comps = fit_completions(prompts, completions, max_length)
        rows = [i for i, c in enumerate(comps) if c]
        seqs = [ScoreSequence(prompt_ids=list(prompts[i]), completion_ids=list(comps[i])) for i in rows]
        req = ScoreRequest(
            request_id=f"score-{uuid.uuid4().hex[:12]}", sequences=seqs, k=self.train_k if train else self.k
        )
        if seqs:
            self.client.submit_score(req)
        return Scoring(req, rows)

    def collect(self, pending: Scoring, batch: Batch) -> TeacherTargets:
        """The teacher's targets for `batch` (the batch `pending` was submitted for), as [B, C, ...]."""
        B, C = batch.labels.shape
        k = pending.req.k
        ids = torch.zeros(B, C, k, dtype=torch.long)
        lps = torch.zeros(B, C, k)
        tok = torch.zeros(B, C)
        if pending.rows:
            reply = self._result(pending)
            for row, sc in zip(pending.rows, reply.scores, strict=True):
                n = len(sc.token_logprobs)
                ids[row, :n] = torch.tensor(sc.topk_ids, dtype=torch.long)
                lps[row, :n] = torch.tensor(sc.topk_logprobs)
                tok[row, :n] = torch.tensor(sc.token_logprobs)
                self.positions += n
            if int(ids.max()) >= self.vocab:
                raise UserError(
                    f"teacher server {self.url} sent top-k id {int(ids.max())} outside the student's "
                    f"vocabulary of {self.vocab}; the teacher's embedding has rows the student lacks"
                )
        dev = batch.labels.device
        return TeacherTargets(topk_ids=ids.to(dev), topk_logprobs=lps.to(dev), token_logprobs=tok.to(dev))

    def _result(self, pending: Scoring):
        """The reply for `pending`; resent while the server(s) are away (a teacher keeps no state)."""
        t0 = time.perf_counter()

        def ask_again(e: Exception) -> None:
            log.warning("teacher server %s unavailable (%s): asking again", self.url, e)
            pending.req.request_id = f"score-{uuid.uuid4().hex[:12]}"
            self.client.submit_score(pending.req)

        try:
            reply = _until_deadline(
                lambda _: self.client.score_result(pending.req.request_id, timeout_s=self.timeout_s),
                self.deadline_s,
                lambda e: (
                    f"teacher server {self.url} did not answer within {self.deadline_s:g}s ({e}); "
                    "restart gkd-rollout-server --role teacher or fix --teacher_url"
                ),
                ask_again,
            )
        except RemoteError as e:
            raise UserError(f"teacher server {self.url} refused to score: {e}") from None
        self.wait_s += time.perf_counter() - t0
        if reply.tokenizer_fingerprint != self.fingerprint:
            raise UserError(_tokenizer_differs(self.url, reply.model))
        return reply

    def generate(
        self, prompts: list[list[int]], *, temperature: float, max_new_tokens: int, seed: int
    ) -> list[list[int]]:
        """Teacher-written completions, sampled by the teacher server."""
        req = GenerateRequest(
            request_id=f"teacher-gen-{uuid.uuid4().hex[:12]}",
            prompts=[Prompt(prompt_id=str(i), token_ids=list(p)) for i, p in enumerate(prompts)],
            sampling=SamplingSpec(
                temperature=temperature, top_k=0, top_p=1.0, max_new_tokens=max_new_tokens, seed=seed
            ),
        )
        try:
            reply = self.client.generate(req, timeout_s=self.timeout_s)
        except (ServerUnavailable, RemoteError) as e:
            raise UserError(f"teacher server {self.url} could not sample: {e}") from None
        return [c.token_ids for c in reply.completions]

    def close(self) -> None:
        self.client.close()


def open_remote(cfg: Any, student_tokenizer: Any) -> RemoteTeacher:
    """Connect to the teacher server(s) of cfg.model.teacher_url and check each (see the module
    docstring); UserError with one line on any mismatch."""
    from shared.transport import connect, split_urls
    from shared.vocab import tokenizer_fingerprint

    url, r, g = cfg.model.teacher_url, cfg.rollout, cfg.gkd
    want = tokenizer_fingerprint(student_tokenizer)
    train_k = 1 if g.loss_type == "sampled_rkl" else g.teacher_topk  # sampled RKL needs one log-prob
    models = set()
    for u in split_urls(url):
        client = connect(u, token=r.token, timeout_s=r.request_timeout_s)
        try:
            models.add(_check_one(client, u, want, max(g.teacher_topk, train_k), r.reconnect_deadline_s))
        finally:
            client.close()
    if len(models) > 1:
        raise UserError(
            f"teacher_url={url!r}: the servers run different models ({', '.join(sorted(models))})"
        )
    client = connect(url, token=r.token, timeout_s=r.request_timeout_s)
    vocab = len(student_tokenizer.get_vocab())
    log.info(
        "teacher: remote %s (model %s), top-k %d, loss %s; no teacher weights are loaded in the learner",
        url,
        models.pop(),
        train_k,
        g.loss_type if g.loss_type != "jsd" else "top-k + tail jsd",
    )
    return RemoteTeacher(
        client,
        url,
        k=g.teacher_topk,
        train_k=train_k,
        vocab=vocab,
        fingerprint=want,
        timeout_s=r.request_timeout_s,
        deadline_s=r.reconnect_deadline_s,
    )


def _check_one(client: Any, url: str, fingerprint: str, k: int, deadline_s: float) -> str:
    """Refuse a server that is not a teacher, tokenizes otherwise, or cannot send k entries; return its model."""
    t_end = time.monotonic() + deadline_s
    status = _until_deadline(
        lambda left: client.status(timeout_s=max(1.0, min(10.0, left))),
        deadline_s,
        lambda e: (
            f"teacher server {url} did not answer within {deadline_s:g}s ({e}); start "
            "gkd-rollout-server --role teacher --model TEACHER, or fix --teacher_url / --reconnect_deadline_s"
        ),
    )
    if status.role != "teacher":
        raise UserError(
            f"teacher_url {url} is a {status.role} rollout server (model {status.model}), not a teacher; "
            "start gkd-rollout-server --role teacher --model TEACHER and give that as --teacher_url"
        )
    if status.tokenizer_fingerprint != fingerprint:
        raise UserError(_tokenizer_differs(url, status.model))
    probe = ScoreRequest(
        request_id=f"probe-{uuid.uuid4().hex[:8]}",
        sequences=[ScoreSequence(prompt_ids=[0], completion_ids=[0])],
        k=k,
    )
    try:
        client.score(probe, timeout_s=max(10.0, t_end - time.monotonic()))
    except RemoteError as e:
        raise UserError(
            f"teacher server {url} refused a top-{k} score request ({e.message}); lower --teacher_topk or "
            "restart it with a larger --max_logprobs"
        ) from None
    return status.model


def _tokenizer_differs(url: str, model: str) -> str:
    return (
        f"teacher server {url} (model {model}) tokenizes differently from the student (tokenizer fingerprints "
        "differ); GKD compares next-token distributions, so both must share one tokenizer"
    )


def _until_deadline(
    call: Callable[[float], Any],
    deadline_s: float,
    give_up: Callable[[Exception], str],
    between: Callable[[Exception], None] | None = None,
) -> Any:
    """`call(seconds left)` until it answers; while the server is unavailable, `between(error)` and
    try again a second later, until `deadline_s`; then one UserError line, `give_up(error)`."""
    t_end = time.monotonic() + deadline_s
    while True:
        try:
            return call(t_end - time.monotonic())
        except ServerUnavailable as e:
            if time.monotonic() >= t_end:
                raise UserError(give_up(e)) from None
            time.sleep(1.0)
            if between is not None:
                between(e)
