"""The rollout service: requests in, replies out, on the engine's event loop.

Transports (ZeroMQ, Ray, in-process) hand requests to `handle_bytes` or
`submit` from any thread and get exactly one reply through the callback they pass (called from the
engine loop's thread). The work itself runs as coroutines on that loop:

- each prompt of a GenerateRequest becomes its own engine request the moment the request arrives,
  so vLLM batches the sequences of every request in flight together (continuous batching);
- a PushAdapter closes a gate: generate requests that arrive wait at it, the ones in flight finish
  on the old weights, then the workers reload in place (with vLLM's generation paused too, for
  requests that reach the engine by other routes), the version moves on and the gate opens.

vLLM's OpenAI app (`http.py`) sends its requests straight to the same engine, each admitted
through the same gate (`admitted`). So the weights never change under a running request: every GenerateReply is produced by exactly
one policy version, and says which. A push is fully validated before the engine is touched, and a
rejected push leaves the previous version serving.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import hmac
import logging
import os
import shutil
import tempfile
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import msgspec

from rollout_server.settings import ServerSettings, with_sync_mode
from shared.fingerprint import model_fingerprint
from shared.messages import (
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
    request_id_of,
)

log = logging.getLogger("gkd.rollout_server")

_MiB = 1024 * 1024
_STATS_WINDOW_S = 60.0  # tokens/s is measured over requests that ended this recently
STALE_HOOK = "GKD_TEST_STALE_WEIGHTS"


class ServiceClosed(RuntimeError):
    """The service is shutting down."""


class _Once:
    """A reply callback that delivers only its first reply (and never raises)."""

    def __init__(self, reply: Callable[[Any], None]):
        self._reply, self._lock, self.done = reply, threading.Lock(), False

    def __call__(self, r: Any) -> None:
        with self._lock:
            if self.done:
                return
            self.done = True
        try:
            self._reply(r)
        except Exception:  # noqa: BLE001 - a dead transport must not kill the loop
            log.exception("reply callback failed")


class RolloutService:
    def __init__(self, engine: Any, settings: ServerSettings, *, adapter_root: str | Path | None = None):
        settings = with_sync_mode(settings)
        if settings.needs_token() and not settings.token:
            raise ValueError(
                f"host={settings.host} is beyond loopback: a token is required (--token or GKD_TOKEN)"
            )
        from rollout_server.weights import AdapterCheck
        from shared.vocab import tokenizer_fingerprint

        self.engine = engine
        self.loop: asyncio.AbstractEventLoop = engine.loop
        self.settings = settings
        self.teacher = settings.role == "teacher"
        self.max_bytes = settings.max_message_mb * _MiB
        self._token = settings.token.encode() if settings.token else None
        # A teacher never takes pushes: nothing to validate them against.
        self.check = None if self.teacher else AdapterCheck(settings.model)
        self.fingerprint = model_fingerprint(settings.model)
        tok = getattr(engine, "tokenizer", None)  # "" (cannot tell) for an engine without one
        self.tokenizer_fingerprint = tokenizer_fingerprint(tok) if tok is not None else ""
        # Test-only (the learner's policy-mismatch test): after each push and its canary, put the
        # previous weights back, so the server samples the old policy while it reports the new one.
        self._stale = os.environ.get(STALE_HOOK) == "1"
        if self._stale:
            if settings.sync_mode != "merged":
                raise ValueError(f"{STALE_HOOK}=1 is implemented for --sync_mode merged only")
            log.warning("%s=1: pushes are reverted after their canary (test hook)", STALE_HOOK)
        self._own_root = adapter_root is None and settings.sync_mode == "lora" and not self.teacher
        if self._own_root:
            adapter_root = tempfile.mkdtemp(prefix="gkd-adapters-")
        self._adapter_root = Path(adapter_root) if adapter_root else None
        self.version = 0  # policy version serving now; 0 = the base model
        self._version_sha = ""  # sha256 of the adapter serving now
        self._serving: tuple[str, bytes, float] = (
            "lora",
            b"",
            0.0,
        )  # merged mode: (kind, data, scale) loaded
        self.healthy = True
        self.last_reload_s = 0.0
        self._started = time.monotonic()
        self._stats_lock = threading.Lock()
        self._recent: deque[tuple[float, float, int]] = deque()  # (start, end, tokens) per request
        self._pending = 0  # generate requests received and not answered yet (under _stats_lock)
        self.served_requests = self.served_sequences = 0  # Status counters (under _stats_lock)
        self._closing = False
        # Loop state (touched only on the loop): asyncio primitives bind to the loop on first use.
        self._cv = asyncio.Condition()  # notified when the version, the gate or _inflight change
        self._push_lock = asyncio.Lock()  # pushes run one at a time, in arrival order
        self._pushing = False  # the gate: True while a push drains, reloads and checks its canary
        self._inflight = 0  # generate requests running in the engine now
        self._tasks: set[asyncio.Task] = set()

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
                        request_id=request_id_of(data),
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
        once = _Once(reply)
        if isinstance(body, StatusRequest):
            once(self.status())
            return
        rid = getattr(body, "request_id", "")
        refusal = _unavailable(rid) if self._closing else self._refusal(body)
        if refusal is not None:
            once(refusal)
        elif isinstance(body, GenerateRequest):
            with self._stats_lock:
                self._pending += 1
            self._spawn(self._generate(body, once), once, rid)
        elif isinstance(body, ScoreRequest):
            self._spawn(self._score(body, once), once, rid)
        else:
            self._spawn(self._push(body, once), once, rid)

    def _refusal(self, body: Any) -> ErrorReply | None:
        """The reply refusing `body` before it reaches the engine, or None to run it."""
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
                max_model_len=self.engine.max_model_len,
            )
        elif isinstance(body, GenerateRequest):
            problem = self._check_generate(body)
        else:
            problem = ""
        return ErrorReply(code="bad_request", message=problem, request_id=rid) if problem else None

    @contextlib.asynccontextmanager
    async def admitted(self) -> AsyncIterator[int]:
        """On the loop: hold one request of another front end on this engine (vLLM's OpenAI app)
        in flight like a generate request: it waits while a push reloads, a push waits for it,
        and it runs on one policy version, the one yielded."""
        version = await self._enter()
        try:
            yield version
        finally:
            await self._leave()

    def status(self) -> Status:
        now = time.monotonic()
        with self._stats_lock:
            depth = self._pending
            recent = [(s, e, n) for s, e, n in self._recent if e > now - _STATS_WINDOW_S]
        span = max((e for _, e, _ in recent), default=0.0) - min((s for s, _, _ in recent), default=0.0)
        return Status(
            policy_version=self.version,
            queue_depth=depth,
            tokens_per_s=sum(n for _, _, n in recent) / span if span > 0 else 0.0,
            last_reload_s=self.last_reload_s,
            healthy=self.healthy and self.engine.alive,
            model=self.settings.model,
            sync_mode=self.settings.sync_mode,
            dtype=self.engine.dtype_name,
            max_lora_rank=self.settings.max_lora_rank,
            uptime_s=now - self._started,
            model_fingerprint=self.fingerprint,
            role=self.settings.role,
            tokenizer_fingerprint=self.tokenizer_fingerprint,
            served_requests=self.served_requests,
            served_sequences=self.served_sequences,
        )

    def close(self, timeout_s: float = 30.0) -> None:
        """Stop taking work; requests not answered yet get an 'unavailable' error. Idempotent."""
        if self._closing:
            return
        self._closing = True
        if self.loop.is_running():
            fut = asyncio.run_coroutine_threadsafe(self._cancel_all(), self.loop)
            try:
                fut.result(timeout_s)
            except (concurrent.futures.TimeoutError, RuntimeError):
                log.warning("service close: pending requests did not stop within %.0f s", timeout_s)
        if self._own_root and self._adapter_root is not None:
            shutil.rmtree(self._adapter_root, ignore_errors=True)

    # ---- on the loop ----------------------------------------------------------------------

    def _spawn(self, coro: Awaitable[None], once: _Once, rid: str) -> None:
        async def guarded() -> None:
            task = asyncio.current_task()
            assert task is not None
            self._tasks.add(task)
            try:
                await coro
            except asyncio.CancelledError:
                once(_unavailable(rid))
            except Exception as e:  # noqa: BLE001 - a bug here must not strand the request
                log.exception("request failed")
                self.healthy = self.engine.alive
                once(ErrorReply(code="internal", message=f"server error: {e}", request_id=rid))
            finally:
                self._tasks.discard(task)
                once(_unavailable(rid))  # a no-op unless nothing answered

        asyncio.run_coroutine_threadsafe(guarded(), self.loop)

    async def _cancel_all(self) -> None:
        async with self._cv:
            self._cv.notify_all()
        tasks = [t for t in self._tasks if t is not asyncio.current_task()]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _enter(self) -> int:
        """Wait for the gate, then count this request in flight; returns the version serving it."""
        async with self._cv:
            await self._cv.wait_for(lambda: not self._pushing or self._closing)
            if self._closing:
                raise asyncio.CancelledError
            self._inflight += 1
            return self.version

    async def _leave(self) -> None:
        async with self._cv:
            self._inflight -= 1
            self._cv.notify_all()

    async def _generate(self, req: GenerateRequest, reply: _Once) -> None:
        try:
            if req.min_version > self.version and not await self._wait_version(req.min_version):
                msg = f"policy version {req.min_version} was not pushed within {self.settings.min_version_wait_s:.0f} s (serving {self.version})"
                reply(ErrorReply(code="version_timeout", message=msg, request_id=req.request_id))
                return
            version = await self._enter()
            t0, start = time.perf_counter(), time.monotonic()
            try:
                s = req.sampling
                comps = await asyncio.gather(
                    *(
                        self.engine.generate(
                            p.prompt_id,
                            list(p.token_ids),
                            msgspec.structs.replace(s, seed=None if s.seed is None else s.seed + i),
                        )
                        for i, p in enumerate(req.prompts)
                    )
                )
            except Exception as e:  # noqa: BLE001 - one failed request must not kill the server
                log.exception("generate failed")
                self.healthy = self.engine.alive
                reply(
                    ErrorReply(code="internal", message=f"generation failed: {e}", request_id=req.request_id)
                )
                return
            finally:
                await self._leave()
            self.healthy = True
            with self._stats_lock:
                now = time.monotonic()
                self._recent.append((start, now, sum(len(c.token_ids) for c in comps)))
                while self._recent and self._recent[0][1] < now - _STATS_WINDOW_S:
                    self._recent.popleft()
                self.served_requests += 1
                self.served_sequences += len(comps)
            reply(
                GenerateReply(
                    request_id=req.request_id,
                    policy_version=version,
                    completions=list(comps),
                    generate_s=time.perf_counter() - t0,
                )
            )
        finally:
            with self._stats_lock:
                self._pending -= 1

    async def _score(self, req: ScoreRequest, reply: _Once) -> None:
        from rollout_server.teacher import score

        t0 = time.perf_counter()
        try:
            scores = await score(self.engine, req)
            self.healthy = True
        except Exception as e:  # noqa: BLE001 - one bad request must not kill the server
            log.exception("score failed")
            self.healthy = self.engine.alive
            reply(ErrorReply(code="internal", message=f"scoring failed: {e}", request_id=req.request_id))
            return
        reply(
            ScoreReply(
                request_id=req.request_id,
                scores=scores,
                model=self.settings.model,
                tokenizer_fingerprint=self.tokenizer_fingerprint,
                score_s=time.perf_counter() - t0,
            )
        )

    async def _wait_version(self, version: int) -> bool:
        """Wait until `version` serves (True) or min_version_wait_s passes (False)."""
        async with self._cv:
            try:
                await asyncio.wait_for(
                    self._cv.wait_for(lambda: self.version >= version or self._closing),
                    self.settings.min_version_wait_s,
                )
            except TimeoutError:
                return False
        if self._closing:
            raise asyncio.CancelledError
        return True

    async def _push(self, msg: PushAdapter, reply: _Once) -> None:
        from rollout_server.weights import ChecksumError
        from shared.adapters import AdapterError

        async with self._push_lock:
            t0 = time.perf_counter()
            try:
                reload_s = await self._apply_push(msg, t0)
            except ChecksumError as e:
                return reply(ErrorReply(code="checksum", message=str(e)))
            except (AdapterError, _VersionError) as e:
                code = "invalid_adapter" if isinstance(e, AdapterError) else "bad_version"
                return reply(ErrorReply(code=code, message=str(e)))
            except Exception as e:  # noqa: BLE001 - the server reports and keeps running
                log.exception("push of version %d failed", msg.version)
                self.healthy = self.engine.alive
                return reply(
                    ErrorReply(code="internal", message=f"reload of version {msg.version} failed: {e}")
                )
        log.info("serving policy version %d (reload %.3f s)", self.version, reload_s)
        reply(
            PushReply(
                version=self.version,
                reload_s=reload_s,
                canary_logprobs=self._canary,
                serving_dtype=self.engine.dtype_name,
            )
        )

    async def _apply_push(self, msg: PushAdapter, t0: float) -> float:
        """Validate everything, then drain, load and score the canary; returns seconds from the
        start of this push to the new weights serving."""
        from shared.adapters import AdapterError

        if msg.version == self.version and msg.version > 0 and msg.sha256.lower() == self._version_sha:
            # The same adapter again (a learner re-pushing after a reconnect): a no-op.
            self._canary = await self._score_canary(msg)
            return 0.0
        if msg.version <= self.version:
            raise _VersionError(f"push version {msg.version} is not above the serving version {self.version}")
        if msg.kind == "full":
            if self.settings.sync_mode != "merged":
                raise AdapterError(
                    "a full push (whole tensors) needs a server started with --sync_mode merged"
                )
            await asyncio.to_thread(self._checker().full, msg.adapter, msg.sha256)
            payload = ("full", msg.adapter, 0.0)
        elif msg.kind == "lora" and msg.lora is not None:
            from shared.adapters import scale_of

            await asyncio.to_thread(
                self._checker().lora, msg.adapter, msg.sha256, msg.lora, self.settings.max_lora_rank
            )
            payload = ("lora", msg.adapter, scale_of(msg.lora))
        else:
            raise AdapterError(f"push kind {msg.kind!r} needs lora settings (kind 'lora') or kind 'full'")
        async with self._cv:  # close the gate and let the requests in flight finish
            self._pushing = True
            await self._cv.wait_for(lambda: self._inflight == 0)
        previous = self._serving
        try:
            if self.settings.sync_mode == "merged":
                await self.engine.reload(*payload)
                self._serving = payload
            else:
                await self._load_lora(msg)
            self.version, self._version_sha = msg.version, msg.sha256.lower()
            self.last_reload_s = time.perf_counter() - t0
            self._canary = await self._score_canary(msg)
            if self._stale:
                await self.engine.reload(*previous)
                self._serving = previous
                log.warning("%s: version %d reported, previous weights serving", STALE_HOOK, msg.version)
        finally:
            async with self._cv:
                self._pushing = False
                self._cv.notify_all()
        return self.last_reload_s

    async def _score_canary(self, msg: PushAdapter) -> list[float]:
        return await self.engine.score(list(msg.canary_ids))

    async def _load_lora(self, msg: PushAdapter) -> None:
        from rollout_server.weights import write_adapter_dir

        assert self._adapter_root is not None and msg.lora is not None, "lora mode needs adapter_root"
        new_dir = await asyncio.to_thread(
            write_adapter_dir, self._adapter_root, msg.version, msg.adapter, msg.lora
        )
        try:
            old = await self.engine.load_lora(msg.version, str(new_dir))
        except Exception:
            shutil.rmtree(new_dir, ignore_errors=True)
            raise
        if old is not None and old.lora_int_id != msg.version:
            await self.engine.remove_lora(old.lora_int_id)
        for d in self._adapter_root.iterdir():  # vLLM holds the adapter in memory now
            if d != new_dir:
                shutil.rmtree(d, ignore_errors=True)

    # ---- helpers --------------------------------------------------------------------------

    def _checker(self) -> Any:
        assert self.check is not None, "a teacher takes no pushes (refused in submit)"
        return self.check

    def _check_generate(self, req: GenerateRequest) -> str:
        """A problem with a generate request, or ''. Checked before it reaches the engine."""
        s = req.sampling
        vocab = self.engine.vocab_size
        max_len = self.engine.max_model_len
        if not (s.temperature >= 0 and 0 < s.top_p <= 1 and s.top_k >= 0 and s.max_new_tokens >= 1):
            return f"bad sampling settings {s}: need temperature >= 0, 0 < top_p <= 1, top_k >= 0, max_new_tokens >= 1"
        if s.seed is not None and not 0 <= s.seed < 2**63 - len(req.prompts):
            return f"seed {s.seed} out of range [0, 2**63)"
        if any(not 0 <= t < vocab for t in s.stop_token_ids):
            return f"stop_token_ids outside the vocabulary [0, {vocab})"
        for p in req.prompts:
            if not p.token_ids:
                return f"prompt {p.prompt_id!r} is empty"
            if len(p.token_ids) + s.max_new_tokens > max_len:
                return (
                    f"prompt {p.prompt_id!r}: {len(p.token_ids)} tokens + max_new_tokens {s.max_new_tokens} "
                    f"exceed the server's max_model_len {max_len}; shorten it or restart with a larger --max_model_len"
                )
            if min(p.token_ids) < 0 or max(p.token_ids) >= vocab:
                return f"prompt {p.prompt_id!r} holds token ids outside the vocabulary [0, {vocab})"
        return ""


def _unavailable(rid: str) -> ErrorReply:
    return ErrorReply(
        code="unavailable", message="rollout server shutting down; retry after it restarts", request_id=rid
    )


class _VersionError(ValueError):
    pass
