"""Keeping the server's policy equal to the learner's: adapter pushes, canary checks, resume handshake.

Every push carries a fixed canary token sequence; the server scores it right after the reload and
the learner scores it with its own student (HF + PEFT, adapter active). The two must agree within a
dtype-aware tolerance, or training stops: a mismatch means the server serves something else (another
base model, a failed reload) and every later rollout would be silently off-policy.

Tolerance (measured: vLLM fp32 vs HF fp32 differ by <= 3e-5; bf16 by up to ~0.2 per token,
for the unmodified base model too):

* both sides fp32: max |Δ logprob| <= 1e-3;
* either side bf16/fp16: mean |Δ| < 0.05 and max |Δ| < 0.5.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from learner.errors import UserError
from learner.models import adapter_tensors, token_logprobs
from shared.adapters import pack, sha256_hex
from shared.messages import GenerateRequest, LoraSpec, Prompt, PushAdapter, SamplingSpec
from shared.transport.base import ServerUnavailable

log = logging.getLogger("gkd.learner")

CANARY_TEXT = (
    "Knowledge distillation canary: the student learns what the teacher would say next, one token at a time."
)
FP32_MAX_ABS = 1e-3
LOW_PRECISION_MEAN_ABS = 0.05
LOW_PRECISION_MAX_ABS = 0.5


class CanaryMismatch(UserError):
    """The server's canary logprobs differ from the learner's beyond tolerance."""


@dataclass
class PushResult:
    version: int  # the version the server now serves
    reload_s: float  # server-side reload latency
    push_s: float  # learner-side wall time of the whole push (pack + send + reload + canary)
    canary_max_abs: float  # max |Δ logprob| between server and learner on the canary
    canary_mean_abs: float
    sha256: str = ""  # digest of the pushed adapter: what `version` names from now on


def canary_ids(tokenizer, n: int = 24) -> list[int]:
    ids = tokenizer(CANARY_TEXT, add_special_tokens=False)["input_ids"][:n]
    if len(ids) < 2:
        raise UserError(
            "the tokenizer turns the canary text into fewer than 2 tokens; cannot check adapter sync"
        )
    return ids


def compare(
    ours: list[float], theirs: list[float], learner_dtype: torch.dtype, serving_dtype: str
) -> tuple[float, float]:
    """(mean |Δ|, max |Δ|); raises CanaryMismatch beyond the tolerance for these dtypes."""
    if len(ours) != len(theirs):
        raise CanaryMismatch(f"the server returned {len(theirs)} canary logprobs, expected {len(ours)}")
    diffs = [abs(a - b) for a, b in zip(ours, theirs)]
    mean, mx = sum(diffs) / len(diffs), max(diffs)
    fp32 = learner_dtype == torch.float32 and serving_dtype in ("float32", "torch.float32", "fp32")
    ok = mx <= FP32_MAX_ABS if fp32 else (mean < LOW_PRECISION_MEAN_ABS and mx < LOW_PRECISION_MAX_ABS)
    if not ok:
        rule = (
            f"max <= {FP32_MAX_ABS}"
            if fp32
            else f"mean < {LOW_PRECISION_MEAN_ABS} and max < {LOW_PRECISION_MAX_ABS}"
        )
        raise CanaryMismatch(
            f"the server's canary logprobs differ from the learner's (mean |Δ| {mean:.3g}, max |Δ| {mx:.3g}; "
            f"allowed {rule} for learner {learner_dtype} / server {serving_dtype}): the server serves a different "
            "base model or its weight reload failed; start it with the student model as --model"
        )
    return mean, mx


def push_adapter(
    client,
    student,
    lora: LoraSpec,
    version: int,
    canary: list[int],
    device,
    dtype: torch.dtype,
    timeout_s: float | None = None,
) -> PushResult:
    """Push the student's adapter as `version` and check the server's canary against ours (every
    replica's, when the client is a replica set; it checks rejoining replicas with the same check)."""
    t0 = time.perf_counter()
    data = pack(adapter_tensors(student))
    msg = PushAdapter(version=version, adapter=data, sha256=sha256_hex(data), lora=lora, canary_ids=canary)
    ours = token_logprobs(student, canary, device)  # the weights being pushed: the same before or after
    worst = [0.0, 0.0]  # (mean, max) |Δ| over the replicas checked

    def verify(reply) -> None:
        mean, mx = compare(ours, list(reply.canary_logprobs), dtype, reply.serving_dtype)
        worst[:] = [max(worst[0], mean), max(worst[1], mx)]

    reply = client.push_adapter(msg, timeout_s=timeout_s, verify=verify)
    return PushResult(reply.version, reply.reload_s, time.perf_counter() - t0, worst[1], worst[0], msg.sha256)


def adapter_sha(student) -> str:
    """The digest a push of the student's current adapter carries."""
    return sha256_hex(pack(adapter_tensors(student)))


def check_fingerprint(status, student_path: str, url: str) -> None:
    """Refuse a server whose base model is not our student's, before anything is pushed to it.

    Compares `Status.model_fingerprint` with shared.fingerprint.model_fingerprint of the student
    (config + tokenizer files). Either side "" (a server that cannot tell, a hub id not in the local
    cache) skips the check with a warning; the canary after the first push still stands guard.
    """
    from shared.fingerprint import model_fingerprint, short

    ours, theirs = model_fingerprint(student_path), status.model_fingerprint
    if not ours or not theirs:
        log.warning(
            "cannot compare base models before the first push (fingerprint: server %s, student %s)",
            short(theirs),
            short(ours),
        )
        return
    if ours != theirs:
        raise UserError(
            f"rollout server {url} serves the base model {status.model!r} (fingerprint {short(theirs)}), but the "
            f"student is {student_path!r} (fingerprint {short(ours)}): they differ in config or tokenizer; "
            "nothing was pushed; start gkd-rollout-server with --model set to the student model"
        )


def wait_for_server(client, url: str, deadline_s: float):
    """Status of the server, retrying until `deadline_s`; UserError if it never answers.

    While it does not answer yet (a server still starting), says so once, with the deadline.
    """
    t_end = time.monotonic() + deadline_s
    said = False
    while True:
        try:
            return client.status(timeout_s=max(1.0, min(10.0, t_end - time.monotonic())))
        except ServerUnavailable as e:
            if not said:
                left = max(0.0, t_end - time.monotonic())
                at = time.strftime("%H:%M:%S UTC", time.gmtime(time.time() + left))
                log.info(
                    "waiting for rollout server %s (not answering yet: still starting?) until %s, %gs from now "
                    "(--reconnect_deadline_s)",
                    url,
                    at,
                    deadline_s,
                )
                said = True
            if time.monotonic() >= t_end:
                raise UserError(
                    f"rollout server {url} did not answer within {deadline_s:g}s ({e}); start gkd-rollout-server "
                    "with the student model, or fix --rollout_url / --reconnect_deadline_s"
                ) from None
            time.sleep(min(1.0, max(0.0, t_end - time.monotonic())))


def server_has_adapter(
    client, student, version: int, canary: list[int], device, dtype, timeout_s: float | None = None
) -> bool:
    """Does the server, at `version`, already serve exactly our student's weights?

    Used on resume when the server's version equals the checkpoint's: a short greedy continuation of
    the canary, scored by both sides, must agree within the canary tolerance.
    """
    req = GenerateRequest(
        request_id=f"resume-check-{version}",
        prompts=[Prompt(prompt_id="canary", token_ids=canary)],
        sampling=SamplingSpec(temperature=0.0, max_new_tokens=8, seed=0),
        min_version=version,
    )
    reply = client.generate(req, timeout_s=timeout_s)
    c = reply.completions[0]
    if reply.policy_version != version or not c.token_ids:
        return False
    ours = token_logprobs(student, canary + list(c.token_ids), device)[len(canary) - 1 :]
    serving = client.status(timeout_s=timeout_s).dtype
    try:
        compare(ours, list(c.logprobs), dtype, serving)
    except CanaryMismatch:
        return False
    return True


def bring_server_to_checkpoint(
    client, student, lora, ckpt_version: int, canary, device, dtype, timeout_s=None, pushed_sha: str = ""
) -> tuple[int, PushResult | None]:
    """On resume or after a reconnect: make the server serve our adapter; return (version, push or None).

    A version number names one adapter, never two: `pushed_sha` is the digest of what was (or was
    being) pushed as `ckpt_version`.

    * our adapter is that one and the server serves it at that version: nothing to do;
    * our adapter is that one and the server is behind (restarted): push it again as that version;
    * otherwise (we trained since that push, or the server moved on): push as a NEW version,
      one above both the server's and ours.
    """
    current = client.status(timeout_s=timeout_s).policy_version
    same = bool(pushed_sha) and pushed_sha == adapter_sha(student)
    if (
        same
        and current == ckpt_version
        and server_has_adapter(client, student, current, canary, device, dtype, timeout_s)
    ):
        log.info("the server already serves our adapter (version %d)", current)
        return current, None
    version = ckpt_version if same and current < ckpt_version else max(current, ckpt_version) + 1
    if version != ckpt_version:
        log.warning(
            "server at version %d, ours %d (%s): pushing our adapter as the new version %d",
            current,
            ckpt_version,
            "the server moved on" if same else "trained since that push",
            version,
        )
    return version, push_adapter(client, student, lora, version, canary, device, dtype, timeout_s)
