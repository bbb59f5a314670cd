"""Where each micro-batch's completions come from, planned ahead so the server never idles.

Every micro-batch is drawn ahead of time: its prompts (from the PromptSampler) and whether it is
on-policy (a seeded draw per micro-batch index, true with probability lmbda). On-policy micro-batches
are submitted to the rollout server as soon as they are planned, up to `max_inflight` in flight, so
the server samples the next batches while the learner trains on the current one.

Off-policy micro-batches use the dataset's (teacher-written) completion, or a completion the
teacher samples here with HF generate when `seq_kd` is set or the dataset is prompt-only — the
seed's order: with probability lmbda student samples, otherwise (seq_kd) teacher samples.

Staleness: a reply made by policy version v, consumed while the learner is at version V, is V - v
versions old. Replies older than `max_staleness` are dropped (and counted) and requested again; a
reply newer than the learner (negative staleness: someone else pushes to the server) is an error.
With the default max_staleness 0 (TRL's strict on-policy), every micro-batch of an optimizer step is
sampled by the weights that step trains, but sampling still overlaps training inside the step: up
to max_inflight micro-batches are generated while the current one trains. Requests for the next
step wait on the server until its push; max_staleness >= 1 lets them run ahead across steps too.
To avoid producing such replies, a request for a micro-batch that will be consumed k pushes from now
carries min_version = current + k - max_staleness (the server parks it until that version arrives,
serving other requests meanwhile), and nothing is planned more than max_staleness + 1 pushes ahead.
The draw depends only on (seed, micro-batch index), so a resumed run replays the same decisions.
"""

from __future__ import annotations

import logging
import random
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from learner.curve import lmbda_at
from learner.data import Cursor, Example, PromptSampler
from learner.errors import UserError
from shared.messages import GenerateRequest, Prompt, SamplingSpec
from shared.transport.base import RemoteError, ServerUnavailable

log = logging.getLogger("gkd.learner")

STUDENT, DATASET, TEACHER = "student", "dataset", "teacher"


def is_on_policy(seed: int, index: int, lmbda: float) -> bool:
    """The seeded on/off-policy draw for micro-batch `index` (true with probability lmbda)."""
    return random.Random(f"policy:{seed}:{index}").random() < lmbda


def request_seed(seed: int, index: int, attempt: int = 0) -> int:
    """Sampling seed for a micro-batch's request; prompt i of it uses this + i on the server."""
    return (seed * 1_000_003 + index * 4099 + attempt * 977) % (2**31 - 1)


@dataclass
class MicroBatch:
    index: int  # global micro-batch number over the whole run (all ranks)
    local: int  # this rank's micro-batch number (step = local // gradient_accumulation_steps)
    examples: list[Example]  # the prompts, per_device_train_batch_size of them
    source: str  # STUDENT (on-policy), DATASET or TEACHER (off-policy)
    cursor_after: Cursor  # the data cursor once this micro-batch (and every earlier one) is consumed
    request_id: str | None = None  # in-flight GenerateRequest, for STUDENT
    completions: list[list[int]] | None = None  # one per example, once resolved
    # STUDENT: the server's log p of each sampled token (Completion.logprobs), same shape as completions
    logprobs: list[list[float]] | None = None
    policy_version: int | None = None  # version that sampled the completions (STUDENT)
    staleness: int | None = None  # learner version at consumption minus policy_version (STUDENT)


@dataclass
class RolloutStats:
    micro_batches: int = 0
    on_policy: int = 0
    teacher: int = 0  # off-policy micro-batches with teacher-generated completions
    dropped_stale: int = 0
    staleness: list[int] = field(default_factory=list)
    wait_s: float = 0.0  # time blocked waiting for the server

    def summary(self) -> dict[str, float | None]:
        st = self.staleness
        return {
            "on_policy_fraction": self.on_policy / self.micro_batches if self.micro_batches else 0.0,
            "teacher_generated_fraction": self.teacher / self.micro_batches if self.micro_batches else 0.0,
            "on_policy_micro_batches": self.on_policy,
            "staleness": sum(st) / len(st) if st else None,
            "staleness_max": max(st) if st else None,
            "dropped_stale": self.dropped_stale,
            "rollout_wait_s": self.wait_s,
        }


class Rollouts:
    """Plans micro-batches ahead and resolves their completions (see the module docstring)."""

    def __init__(
        self,
        client,
        examples: list[Example],
        sampler: PromptSampler,
        *,
        batch_size: int,
        lmbda: float,
        seq_kd: bool,
        seed: int,
        sampling: SamplingSpec,
        max_inflight: int,
        max_staleness: int,
        teacher_generate: Callable[[list[Example], int], list[list[int]]],
        accum: int,
        sync_steps: int,
        first_local: int,
        total_local: int,
        timeout_s: float,
        rank: int = 0,
        world: int = 1,
        on_server_lost: Callable[[str], int] | None = None,
        lmbda_schedule: str = "constant",
    ):
        self.client, self.examples, self.sampler = client, examples, sampler
        self.batch_size, self.lmbda, self.seq_kd, self.seed = batch_size, lmbda, seq_kd, seed
        self.sampling, self.max_inflight, self.max_staleness = sampling, max_inflight, max_staleness
        self.teacher_generate, self.timeout_s = teacher_generate, timeout_s
        self.rank, self.world = rank, world
        self.lmbda_schedule = lmbda_schedule
        # Called when the server drops (learner.reconnect); returns the version it serves again.
        self.on_server_lost, self.reconnects = on_server_lost, 0
        self._resolving: MicroBatch | None = None  # the micro-batch whose reply we are waiting for
        self.next_local, self.total_local = first_local, total_local
        self.accum, self.sync_steps = accum, sync_steps
        self.current_local = first_local  # local index of the micro-batch being consumed
        self.ahead: deque[MicroBatch] = deque()
        self.version = 0
        self.stats = RolloutStats()
        self.consumed = sampler.cursor
        self.max_lookahead = max(4, 4 * max_inflight)

    # ------------------------------------------------------------ planning

    def _plan_one(self) -> MicroBatch:
        round_ids = self.sampler.take(self.batch_size * self.world)  # every rank draws the same round
        mine = round_ids[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]
        index = self.next_local * self.world + self.rank
        self.next_local += 1
        examples = [self.examples[i] for i in mine]
        lmbda = lmbda_at(self.lmbda, self.lmbda_schedule, self.next_local - 1, self.total_local)
        if is_on_policy(self.seed, index, lmbda):
            source = STUDENT
        elif self.seq_kd or any(e.completion_ids is None for e in examples):
            source = TEACHER
        else:
            source = DATASET
        mb = MicroBatch(index, self.next_local - 1, examples, source, self.sampler.cursor)
        if source == STUDENT:
            self._submit(mb, attempt=0)
        return mb

    def _pushes_before(self, local: int) -> int:
        """Adapter pushes between now and the consumption of local micro-batch `local`."""
        return (local // self.accum) // self.sync_steps - (
            self.current_local // self.accum
        ) // self.sync_steps

    def _submit(self, mb: MicroBatch, attempt: int) -> None:
        spec = SamplingSpec(**{**_fields(self.sampling), "seed": request_seed(self.seed, mb.index, attempt)})
        prompts = [Prompt(prompt_id=str(i), token_ids=e.prompt_ids) for i, e in enumerate(mb.examples)]
        min_version = self.version + max(0, self._pushes_before(mb.local) - self.max_staleness)
        rid = f"mb{mb.index}-a{attempt}" + (
            f"-r{self.reconnects}" if self.reconnects else ""
        )  # ids must not repeat
        req = GenerateRequest(request_id=rid, prompts=prompts, sampling=spec, min_version=min_version)
        mb.request_id = self.client.submit(req)

    def _fill(self) -> None:
        inflight = sum(1 for mb in self.ahead if mb.source == STUDENT)
        while (
            self.next_local < self.total_local
            and len(self.ahead) < self.max_lookahead
            and inflight < self.max_inflight
            and self._pushes_before(self.next_local) <= self.max_staleness + 1
        ):
            mb = self._plan_one()
            self.ahead.append(mb)
            inflight += mb.source == STUDENT

    # ------------------------------------------------------------ consuming

    def next(self, version: int) -> MicroBatch:
        """The next micro-batch with its completions, trained on at policy `version`."""
        self.version = version
        self._fill()
        if not self.ahead:
            raise RuntimeError("no micro-batches left: the recipe asked for more than total_local")
        mb = self.ahead.popleft()
        self.current_local = mb.local
        self._fill()  # keep the server busy while we train on `mb`
        if mb.source == STUDENT:
            self._resolve_student(mb, version)
        elif mb.source == TEACHER:
            mb.completions = self.teacher_generate(mb.examples, request_seed(self.seed, mb.index))
        else:
            mb.completions = [e.completion_ids for e in mb.examples]
        self.stats.micro_batches += 1
        self.stats.on_policy += mb.source == STUDENT
        self.stats.teacher += mb.source == TEACHER
        self.consumed = mb.cursor_after
        return mb

    def _resolve_student(self, mb: MicroBatch, version: int) -> None:
        import time

        for attempt in range(1, 4):
            t0 = time.perf_counter()
            try:
                reply = self._result(mb)
                version = self.version  # a reconnect may have moved it on
            except RemoteError as e:
                if e.code != "version_timeout":  # parked too long (a slow step): ask again below
                    raise
                reply = None
            self.stats.wait_s += time.perf_counter() - t0
            if reply is None:
                self._submit(mb, attempt)
                continue
            staleness = version - reply.policy_version
            if staleness < 0:
                raise UserError(
                    f"rollout {mb.request_id} was sampled by policy version {reply.policy_version}, newer than "
                    f"the learner's {version}: something else pushes adapters to this rollout server; give "
                    "every run its own server"
                )
            if staleness <= self.max_staleness:
                mb.completions = [c.token_ids for c in reply.completions]
                mb.logprobs = [c.logprobs for c in reply.completions]
                mb.policy_version, mb.staleness = reply.policy_version, staleness
                self.stats.staleness.append(staleness)
                return
            self.stats.dropped_stale += 1
            log.info(
                "dropped rollout %s: policy version %d is %d behind (max_staleness %d)",
                mb.request_id,
                reply.policy_version,
                staleness,
                self.max_staleness,
            )
            self._submit(mb, attempt)  # min_version = current version: the server waits for it
        raise RuntimeError(f"the rollout server kept answering with stale weights for micro-batch {mb.index}")

    def _result(self, mb: MicroBatch):
        """The reply for `mb`; if the server drops, on_server_lost waits for it, re-syncs it and
        calls `resubmit`, and we ask again."""
        while True:
            try:
                self._resolving = mb
                return self.client.result(mb.request_id, timeout_s=self.timeout_s)
            except ServerUnavailable as e:
                if self.on_server_lost is None:
                    raise
                self.on_server_lost(str(e))
            finally:
                self._resolving = None

    def resubmit(self, version: int) -> None:
        """After a reconnect: every in-flight request died with the connection; send them again
        (same prompts), min_version counted from `version`, the version the server now serves."""
        self.version = version
        self.reconnects += 1
        for m in (self._resolving, *self.ahead):
            if m is not None and m.source == STUDENT:
                self._submit(m, attempt=0)

    def reset_stats(self) -> RolloutStats:
        stats, self.stats = self.stats, RolloutStats()
        return stats

    def consumed_cursor(self) -> Cursor:
        """The cursor after the last consumed micro-batch (what a checkpoint must store)."""
        return self.consumed

    def close(self) -> None:
        self.ahead.clear()  # unanswered requests are simply never collected


def _fields(spec: SamplingSpec) -> dict:
    return {f: getattr(spec, f) for f in spec.__struct_fields__}


# ---------------------------------------------------------------- HF sampling (teacher, evaluation)


def hf_generate(
    model,
    prompts: list[list[int]],
    *,
    pad_id: int,
    eos_id: int | list[int],
    temperature: float,
    max_new_tokens: int,
    device,
    seed: int,
    batch_size: int = 8,
) -> list[list[int]]:
    """Sample completions with HF generate (KV cache on), left-padded, seeded without touching global RNG.

    Each completion ends at its first eos (included); `eos_id` may be a list (the generation
    config's, e.g. Llama 3's <|eot_id|> and <|eom_id|>), as TRL's GKDTrainer stops on. Sampling settings are the seed's: temperature,
    top_k off, top_p 1, no repetition penalty (overriding the checkpoint's generation_config).
    """
    import torch
    from transformers import GenerationConfig

    gen = GenerationConfig(
        do_sample=temperature > 0,
        temperature=temperature if temperature > 0 else None,
        top_k=0,
        top_p=1.0,
        repetition_penalty=1.0,
        max_new_tokens=max_new_tokens,
        pad_token_id=pad_id,
        eos_token_id=eos_id,
        use_cache=True,
    )
    was_training = model.training
    model.eval()
    out: list[list[int]] = []
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.no_grad():
            torch.manual_seed(seed)
            for s in range(0, len(prompts), batch_size):
                chunk = prompts[s : s + batch_size]
                width = max(len(p) for p in chunk)
                ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in chunk], device=device)
                mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk], device=device)
                seqs = model.generate(input_ids=ids, attention_mask=mask, generation_config=gen)
                stops = {eos_id} if isinstance(eos_id, int) else set(eos_id)
                for row in seqs[:, width:].tolist():
                    end = next((i for i, tok in enumerate(row) if tok in stops), None)
                    out.append(row[: end + 1] if end is not None else row)
    finally:
        model.train(was_training)
    return out
