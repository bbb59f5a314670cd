"""The rollout service: requests in, replies out, one engine thread in between.

Transports (ZeroMQ, Ray, in-process, the OpenAI HTTP endpoint) hand requests to `handle_bytes` or
`submit` from any thread and get exactly one reply through the callback they pass. A single engine
thread owns the engine. It drains the queue in order:

- consecutive GenerateRequests are batched into ONE engine.generate call;
- a PushAdapter (and any other exclusive work) runs alone, between batches.

So the weights never change while a batch is running: every GenerateReply is produced by exactly
one policy version, and says which. A push is fully validated before the engine is touched, and a
rejected push leaves the previous version serving.
"""

from __future__ import annotations

import hmac
import logging
import shutil
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec

from rollout_server.settings import ServerSettings
from shared.messages import (
    Completion,
    ErrorReply,
    GenerateReply,
    GenerateRequest,
    PushAdapter,
    PushReply,
    Reply,
    ScoreReply,
    ScoreRequest,
    Status,
    StatusRequest,
    decode_request,
    encode,
)

log = logging.getLogger("gkd.rollout_server")

_MiB = 1024 * 1024
_STATS_WINDOW_S = 60.0  # tokens/s is measured over batches that ended this recently


class ServiceClosed(RuntimeError):
    """The service is shutting down."""


@dataclass
class _Work:
    """One queued unit for the engine thread."""

    body: Any  # GenerateRequest, PushAdapter, or a callable(engine) for exclusive work
    reply: Callable[[Any], None]  # called exactly once, from the engine thread
    received: float = field(default_factory=time.monotonic)
    deadline: float = 0.0  # for generate requests waiting on min_version


class RolloutService:
    def __init__(self, engine: Any, settings: ServerSettings, *, adapter_root: str | Path | None = None):
        if settings.needs_token() and not settings.token:
            raise ValueError(
                f"host={settings.host} is beyond loopback: a token is required (--token or GKD_TOKEN)"
            )
        from rollout_server.weights import BaseWeights
        from shared.vocab import tokenizer_fingerprint

        self.engine = engine
        self.settings = settings
        self.teacher = settings.role == "teacher"
        self.max_bytes = settings.max_message_mb * _MiB
        self._token = settings.token.encode() if settings.token else None
        tok = getattr(engine, "tokenizer", None)  # "" (cannot tell) for an engine without one
        self.tokenizer_fingerprint = tokenizer_fingerprint(tok) if tok is not None else ""
        if self.teacher:
            self.base = None  # a teacher never takes pushes: no pristine copy of its weights
        else:
            packed = engine.packed_modules() if settings.sync_mode == "merged" else {}
            # lora mode needs only the shapes (for validation); merged mode keeps the fp32 values too.
            self.base = BaseWeights(
                settings.model, engine.dtype, packed, keep_values=settings.sync_mode == "merged"
            )
        self._own_root = adapter_root is None and settings.sync_mode == "lora" and not self.teacher
        if self._own_root:
            adapter_root = tempfile.mkdtemp(prefix="gkd-adapters-")
        self._adapter_root = Path(adapter_root) if adapter_root else None
        self.version = 0  # policy version serving now; 0 = the base model
        self._version_sha = ""  # sha256 of the adapter serving now
        self.healthy = True
        self.last_reload_s = 0.0
        self._started = time.monotonic()
        self._recent: deque[tuple[float, int, float]] = deque()  # (end time, tokens, engine seconds)
        self._cv = threading.Condition()
        self._queue: deque[_Work] = deque()
        self._waiting: list[_Work] = []  # generate requests whose min_version is not serving yet
        self._closing = False
        self._thread = threading.Thread(target=self._run, name="gkd-engine", daemon=True)
        self._thread.start()

    # ---- entry points (any thread) --------------------------------------------------------

    def handle_bytes(self, data: bytes, reply: Callable[[bytes], None]) -> None:
        """Decode one client message and arrange exactly one encoded reply."""
        if len(data) > self.max_bytes:
            reply(
                encode(
                    ErrorReply(
                        code="too_large",
                        message=f"message of {len(data)} bytes is over the server's --max_message_mb={self.settings.max_message_mb}",
                    )
                )
            )
            return
        try:
            env = decode_request(data)
        except (msgspec.DecodeError, msgspec.ValidationError) as e:
            reply(
                encode(
                    ErrorReply(
                        code="bad_request",
                        message=f"malformed message ({e}); send a msgpack Envelope from shared.messages",
                    )
                )
            )
            return
        rid = getattr(env.body, "request_id", "")
        if self._token is not None and not hmac.compare_digest(env.token.encode(), self._token):
            reply(
                encode(
                    ErrorReply(
                        code="unauthorized",
                        message="missing or wrong token; pass the server's --token (GKD_TOKEN)",
                        request_id=rid,
                    )
                )
            )
            return
        self.submit(env.body, lambda r: reply(encode(r)))

    def submit(
        self,
        body: GenerateRequest | PushAdapter | StatusRequest | ScoreRequest,
        reply: Callable[[Reply], None],
    ) -> None:
        """Typed entry point (already authenticated): exactly one reply, possibly from another thread."""
        if isinstance(body, StatusRequest):
            reply(self.status())
            return
        refusal = self._refusal(body)
        if refusal is not None:
            reply(refusal)
            return
        self._enqueue(_Work(body, reply))

    def _refusal(self, body: Any) -> ErrorReply | None:
        """The reply refusing `body` before it is queued, or None to queue it."""
        rid = getattr(body, "request_id", "")
        if isinstance(body, PushAdapter) and self.teacher:
            return ErrorReply(
                code="teacher_role",
                message=f"this server serves the teacher {self.settings.model} (--role teacher) and takes no pushes; push to the student's rollout server",
            )
        if isinstance(body, ScoreRequest):
            if not self.teacher:
                return ErrorReply(
                    code="not_teacher",
                    message="this server serves the student (--role student); send score requests to a --role teacher server",
                    request_id=rid,
                )
            from rollout_server.teacher import check_score

            problem = check_score(
                body,
                vocab=self.engine.vocab_size,
                max_logprobs=self.settings.max_logprobs,
                max_model_len=self.settings.max_model_len,
            )
        elif isinstance(body, GenerateRequest):
            problem = self._check_generate(body)
        else:
            problem = ""
        return ErrorReply(code="bad_request", message=problem, request_id=rid) if problem else None

    def run_exclusive(self, fn: Callable[[Any], Any], timeout_s: float | None = None) -> tuple[Any, int]:
        """Run fn(engine) on the engine thread between batches; returns (result, policy version)."""
        done = threading.Event()
        box: dict[str, Any] = {}

        def reply(r: Any) -> None:
            box["r"] = r
            done.set()

        self._enqueue(_Work(fn, reply))
        if not done.wait(timeout_s):
            raise TimeoutError("engine busy")
        r = box["r"]
        if isinstance(r, BaseException):
            raise r
        return r

    def status(self) -> Status:
        now = time.monotonic()
        with self._cv:
            depth = sum(isinstance(w.body, GenerateRequest) for w in self._queue) + len(self._waiting)
            recent = [(n, s) for t, n, s in self._recent if t > now - _STATS_WINDOW_S]
        busy = sum(s for _, s in recent)
        return Status(
            policy_version=self.version,
            queue_depth=depth,
            tokens_per_s=sum(n for n, _ in recent) / busy if busy > 0 else 0.0,
            last_reload_s=self.last_reload_s,
            healthy=self.healthy and self._thread.is_alive(),
            model=self.settings.model,
            sync_mode=self.settings.sync_mode,
            dtype=self.engine.dtype_name,
            max_lora_rank=self.settings.max_lora_rank,
            uptime_s=now - self._started,
            role=self.settings.role,
            tokenizer_fingerprint=self.tokenizer_fingerprint,
        )

    def close(self, timeout_s: float = 30.0) -> None:
        """Stop the engine thread; queued requests get an 'unavailable' error. Idempotent."""
        with self._cv:
            self._closing = True
            self._cv.notify_all()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout_s)
        if self._own_root and self._adapter_root is not None:
            shutil.rmtree(self._adapter_root, ignore_errors=True)

    # ---- the engine thread ----------------------------------------------------------------

    def _enqueue(self, w: _Work) -> None:
        with self._cv:
            if self._closing:
                closed = True
            else:
                closed = False
                self._queue.append(w)
                self._cv.notify()
        if closed:
            self._safe_reply(w, self._unavailable(w))

    def _run(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                break
            try:
                if isinstance(batch[0].body, GenerateRequest):
                    self._generate(batch)
                elif isinstance(batch[0].body, PushAdapter):
                    self._push(batch[0])
                elif isinstance(batch[0].body, ScoreRequest):
                    self._score(batch[0])
                else:
                    self._exclusive(batch[0])
            except Exception as e:  # noqa: BLE001 - a bug here must not strand every later request
                log.exception("engine thread error")
                for w in batch:
                    err = ErrorReply(
                        code="internal",
                        message=f"server error: {e}",
                        request_id=getattr(w.body, "request_id", ""),
                    )
                    self._safe_reply(w, e if callable(w.body) else err)
        with self._cv:
            left = list(self._queue) + self._waiting
            self._queue.clear()
            self._waiting.clear()
        for w in left:
            self._safe_reply(w, self._unavailable(w))

    def _next_batch(self) -> list[_Work] | None:
        """Block for work: a run of consecutive eligible generate requests, or one exclusive item."""
        with self._cv:
            while True:
                if self._closing:
                    return None
                self._expire_waiting()
                batch: list[_Work] = []
                while self._queue:
                    w = self._queue[0]
                    if isinstance(w.body, GenerateRequest):
                        self._queue.popleft()
                        if w.body.min_version > self.version:
                            w.deadline = time.monotonic() + self.settings.min_version_wait_s
                            self._waiting.append(w)
                        else:
                            batch.append(w)
                        continue
                    if batch:  # the exclusive item waits until this batch is done
                        return batch
                    return [self._queue.popleft()]
                if batch:
                    return batch
                timeout = min((w.deadline for w in self._waiting), default=None)
                self._cv.wait(None if timeout is None else max(0.0, timeout - time.monotonic()) + 0.01)

    def _expire_waiting(self) -> None:
        now = time.monotonic()
        keep = []
        for w in self._waiting:
            if w.deadline <= now:
                msg = f"policy version {w.body.min_version} was not pushed within {self.settings.min_version_wait_s:.0f} s (serving {self.version})"
                # Replying under the lock is fine: callbacks only enqueue bytes for a transport.
                self._safe_reply(
                    w, ErrorReply(code="version_timeout", message=msg, request_id=w.body.request_id)
                )
            else:
                keep.append(w)
        self._waiting = keep

    def _release_waiting(self) -> None:
        """After a push: requests waiting for this version go to the front, in arrival order."""
        with self._cv:
            ready = [w for w in self._waiting if w.body.min_version <= self.version]
            self._waiting = [w for w in self._waiting if w.body.min_version > self.version]
            self._queue.extendleft(reversed(ready))

    def _generate(self, batch: list[_Work]) -> None:
        prompts, specs = [], []
        for w in batch:
            s = w.body.sampling
            for i, p in enumerate(w.body.prompts):
                prompts.append(p)
                specs.append(msgspec.structs.replace(s, seed=None if s.seed is None else s.seed + i))
        version = self.version  # no push can run before this batch finishes (same thread)
        t0 = time.perf_counter()
        try:
            comps = self.engine.generate(prompts, specs) if prompts else []
            self.healthy = True
        except Exception as e:  # noqa: BLE001 - one bad batch must not kill the server
            log.exception("generate failed")
            self.healthy = _engine_alive(e)
            for w in batch:
                self._safe_reply(
                    w,
                    ErrorReply(
                        code="internal", message=f"generation failed: {e}", request_id=w.body.request_id
                    ),
                )
            return
        dt = time.perf_counter() - t0
        with self._cv:
            self._recent.append((time.monotonic(), sum(len(c.token_ids) for c in comps), dt))
            while self._recent and self._recent[0][0] < time.monotonic() - _STATS_WINDOW_S:
                self._recent.popleft()
        it = iter(comps)
        for w in batch:
            mine: list[Completion] = [next(it) for _ in w.body.prompts]
            self._safe_reply(
                w,
                GenerateReply(
                    request_id=w.body.request_id, policy_version=version, completions=mine, generate_s=dt
                ),
            )

    def _score(self, w: _Work) -> None:
        from rollout_server.teacher import score

        req: ScoreRequest = w.body
        t0 = time.perf_counter()
        try:
            scores = score(self.engine, req)
            self.healthy = True
        except Exception as e:  # noqa: BLE001 - one bad request must not kill the server
            log.exception("score failed")
            self.healthy = _engine_alive(e)
            err = ErrorReply(code="internal", message=f"scoring failed: {e}", request_id=req.request_id)
            return self._safe_reply(w, err)
        reply = ScoreReply(
            request_id=req.request_id,
            scores=scores,
            model=self.settings.model,
            tokenizer_fingerprint=self.tokenizer_fingerprint,
            score_s=time.perf_counter() - t0,
        )
        self._safe_reply(w, reply)

    def _push(self, w: _Work) -> None:
        from rollout_server.weights import ChecksumError
        from shared.adapters import AdapterError

        msg: PushAdapter = w.body
        t0 = time.perf_counter()
        try:
            reload_s = self._apply_push(msg, t0)
            canary = self.engine.score(list(msg.canary_ids))
        except ChecksumError as e:
            return self._safe_reply(w, ErrorReply(code="checksum", message=str(e)))
        except (AdapterError, _VersionError) as e:
            return self._safe_reply(
                w,
                ErrorReply(
                    code="invalid_adapter" if isinstance(e, AdapterError) else "bad_version", message=str(e)
                ),
            )
        except Exception as e:  # noqa: BLE001 - the server reports and keeps running
            log.exception("push of version %d failed", msg.version)
            self.healthy = _engine_alive(e)
            return self._safe_reply(
                w, ErrorReply(code="internal", message=f"reload of version {msg.version} failed: {e}")
            )
        log.info("serving policy version %d (reload %.3f s)", self.version, reload_s)
        self._release_waiting()
        self._safe_reply(
            w,
            PushReply(
                version=self.version,
                reload_s=reload_s,
                canary_logprobs=canary,
                serving_dtype=self.engine.dtype_name,
            ),
        )

    def _apply_push(self, msg: PushAdapter, t0: float) -> float:
        """Validate everything, then load; returns seconds from dequeue to new weights serving."""
        if msg.version == self.version and msg.version > 0 and msg.sha256.lower() == self._version_sha:
            return 0.0  # the same adapter again (a learner re-pushing after a reconnect): a no-op
        if msg.version <= self.version:
            raise _VersionError(f"push version {msg.version} is not above the serving version {self.version}")
        if msg.kind != "lora" or msg.lora is None:
            from shared.adapters import AdapterError

            raise AdapterError(
                f"push kind {msg.kind!r} is not supported by this server (it takes LoRA adapters)"
            )
        pairs = self.base.check(msg.adapter, msg.sha256, msg.lora, self.settings.max_lora_rank)
        if self.settings.sync_mode == "merged":
            self.engine.load_merged(self.base.merged(pairs, msg.lora))
            self.base.committed(pairs)
        else:
            from rollout_server.weights import write_adapter_dir

            assert self._adapter_root is not None, "lora mode needs adapter_root"
            new_dir = write_adapter_dir(self._adapter_root, msg.version, msg.adapter, msg.lora)
            try:
                self.engine.load_lora(msg.version, str(new_dir))
            except Exception:
                shutil.rmtree(new_dir, ignore_errors=True)
                raise
            for old in self._adapter_root.iterdir():  # vLLM holds the adapter in memory now
                if old != new_dir:
                    shutil.rmtree(old, ignore_errors=True)
        self.version, self._version_sha = msg.version, msg.sha256.lower()
        self.last_reload_s = time.perf_counter() - t0
        return self.last_reload_s

    def _exclusive(self, w: _Work) -> None:
        try:
            r: Any = (w.body(self.engine), self.version)
        except Exception as e:  # noqa: BLE001 - handed back to the caller
            r = e
        self._safe_reply(w, r)

    # ---- helpers --------------------------------------------------------------------------

    def _check_generate(self, req: GenerateRequest) -> str:
        """A problem with a generate request, or ''. Checked before queueing so one bad request
        cannot fail the batch it would have joined."""
        s = req.sampling
        vocab = self.engine.vocab_size
        if not (s.temperature >= 0 and 0 < s.top_p <= 1 and s.top_k >= 0 and s.max_new_tokens >= 1):
            return f"bad sampling settings {s}: need temperature >= 0, 0 < top_p <= 1, top_k >= 0, max_new_tokens >= 1"
        if s.seed is not None and not 0 <= s.seed < 2**63 - len(req.prompts):
            return f"seed {s.seed} out of range [0, 2**63)"
        if any(not 0 <= t < vocab for t in s.stop_token_ids):
            return f"stop_token_ids outside the vocabulary [0, {vocab})"
        for p in req.prompts:
            if not p.token_ids:
                return f"prompt {p.prompt_id!r} is empty"
            if len(p.token_ids) + s.max_new_tokens > self.settings.max_model_len:
                return (
                    f"prompt {p.prompt_id!r}: {len(p.token_ids)} tokens + max_new_tokens {s.max_new_tokens} "
                    f"exceed the server's max_model_len {self.settings.max_model_len}; shorten it or restart with a larger --max_model_len"
                )
            if min(p.token_ids) < 0 or max(p.token_ids) >= vocab:
                return f"prompt {p.prompt_id!r} holds token ids outside the vocabulary [0, {vocab})"
        return ""

    def _unavailable(self, w: _Work) -> Any:
        if callable(w.body):
            return ServiceClosed("rollout server shutting down")
        return ErrorReply(
            code="unavailable",
            message="rollout server shutting down; retry after it restarts",
            request_id=getattr(w.body, "request_id", ""),
        )

    @staticmethod
    def _safe_reply(w: _Work, r: Any) -> None:
        try:
            w.reply(r)
        except Exception:  # noqa: BLE001 - a dead transport must not kill the engine thread
            log.exception("reply callback failed")


class _VersionError(ValueError):
    pass


def _engine_alive(e: BaseException) -> bool:
    return type(e).__name__ != "EngineDeadError"
