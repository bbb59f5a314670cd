"""A replica set: several rollout servers behind one RolloutClient.

`connect("tcp://a:5555,tcp://b:5555")` (or a list of ray:// names) returns a ReplicaSet; the learner
uses it exactly like one client.

- Routing: a request goes to the replica with the least outstanding work (sequences: one per
  prompt or scored sequence) among the replicas in rotation that already serve its min_version
  (all of them when none does yet: the request waits there for the next push); ties go to the one
  that has served fewer requests. Replies carry the version of the replica that served them.
- Pushes fan out, in parallel, to every replica in rotation; `push_adapter` returns once all of them
  serve the version, each reply checked by the caller's `verify` (the canary). A verify or refusal
  error on any replica is raised as it is; a replica that drops during the push is lost instead.
- A replica is lost when it stops answering (ServerUnavailable) or says it is shutting down. Its
  outstanding requests go to the others at once and a `replica_lost` event is queued. A prober
  thread reconnects to the same address; once the server answers it is pushed the current adapter
  (the same verify) and rejoins the rotation (`replica_rejoined`). While no replica is in rotation
  every call raises ServerUnavailable, so the caller's own reconnect deadline applies; `status` then
  waits (up to its timeout) for a replica to rejoin.
- A replica behind the others (one that answered before any push of this session, e.g. on resume)
  gets no request it cannot serve at once until a push brings it up. A replica's version is known
  from pushes, replies and status; one that looks behind is asked its status again (at most every
  REFRESH_S), which keeps the view current on learner ranks that never push.

Threads: the caller's thread makes every call, as with one client; a push uses one thread per
replica and a prober one thread per lost replica. A replica's client is used by one thread at a
time: lost replicas belong to their prober, the others to the caller (handed over under the lock).
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import msgspec

from shared import messages as m
from shared.transport.base import RemoteError, RolloutClient, ServerUnavailable

log = logging.getLogger("gkd.transport")

SERVING, LOST = "serving", "lost"
PROBE_S = 1.0  # seconds between a prober's attempts (and the timeout of each status probe, x2)
REFRESH_S = 2.0  # a replica that looks behind a request's min_version is re-asked its status this often


@dataclass
class Replica:
    url: str
    client: Any = None  # its RolloutClient; None while lost (the prober holds a new one)
    state: str = SERVING  # SERVING (in rotation) or LOST (its prober is reconnecting)
    version: int = 0  # the policy version it serves, as last seen (status, push, replies)
    outstanding: int = 0  # sequences submitted to it and not yet collected
    served: int = 0  # replies collected from it by this set
    last: m.Status | None = None  # its last status
    seen: float = 0.0  # monotonic time `version` was last learned from a status


@dataclass
class _Pending:
    req: Any  # the caller's request (its own request_id)
    work: int  # sequences it asks for
    replica: Replica | None = None  # where it is now; None when no replica could take it
    inner: str = ""  # the id it has on that replica (unique per placement)


def work_of(req: m.GenerateRequest | m.ScoreRequest) -> int:
    """Outstanding work a request adds: its sequences (prompts to sample, or to score), at least 1."""
    return max(1, len(req.prompts if isinstance(req, m.GenerateRequest) else req.sequences))


def _is_loss(e: BaseException) -> bool:
    return isinstance(e, ServerUnavailable) or (isinstance(e, RemoteError) and e.code == "unavailable")


class ReplicaSet(RolloutClient):
    def __init__(
        self,
        urls: list[str],
        make_client: Callable[[str], RolloutClient],
        *,
        probe_s: float = PROBE_S,
        refresh_s: float = REFRESH_S,
    ):
        if len(set(urls)) != len(urls):
            raise ValueError(f"rollout_url lists a replica twice: {','.join(urls)}")
        self.urls = list(urls)
        self._make, self._probe_s, self._refresh_s = make_client, probe_s, refresh_s
        self._lock = threading.RLock()
        self._joined = threading.Condition(self._lock)
        self._replicas = [Replica(u, state=SERVING) for u in urls]
        self._pending: dict[str, _Pending] = {}
        self._events: list[dict[str, Any]] = []
        self._last_push: tuple[m.PushAdapter, Callable[[m.PushReply], None] | None] | None = None
        self._error: BaseException | None = None  # a prober's hard error, raised by the next call
        self._seq = 0
        self._closed = False
        for r in self._replicas:
            try:
                r.client, r.state = make_client(r.url), SERVING
            except ServerUnavailable as e:
                self._lose(r, str(e))

    # ---- the RolloutClient interface ------------------------------------------------------

    def submit(self, req: m.GenerateRequest | m.ScoreRequest) -> str:
        with self._lock:
            self._check()
            if not req.request_id:
                req.request_id = uuid.uuid4().hex
            if req.request_id in self._pending:
                raise ValueError(f"request id {req.request_id!r} is already in flight")
            p = self._pending[req.request_id] = _Pending(req, work_of(req))
            self._place(p)
            return req.request_id

    def result(self, request_id: str, timeout_s: float | None = None) -> m.GenerateReply:
        return self._collect(request_id, timeout_s)

    # Teacher servers (`score` requests) are routed and failed over the same way.
    def score_result(self, request_id: str, timeout_s: float | None = None) -> m.ScoreReply:
        return self._collect(request_id, timeout_s)

    def _collect(self, request_id: str, timeout_s: float | None) -> Any:
        p = self._pending.get(request_id)
        if p is None:
            raise KeyError(f"unknown request id {request_id!r}")
        while True:
            with self._lock:
                self._check()
                if p.replica is None:
                    self._place(p)  # a replica may have rejoined since
                if p.replica is None:
                    del self._pending[request_id]
                    raise ServerUnavailable(self._all_gone())
                r, inner = p.replica, p.inner
            try:
                if isinstance(p.req, m.ScoreRequest):
                    reply = r.client.score_result(inner, timeout_s)
                else:
                    reply = r.client.result(inner, timeout_s)
            except Exception as e:
                with self._lock:
                    if not _is_loss(e):
                        self._forget(request_id, p)
                        raise
                    self._lose(r, str(e))  # moves p (and the rest of r's work) elsewhere
                continue
            with self._lock:
                self._forget(request_id, p)
                r.served += 1
                if isinstance(reply, m.GenerateReply):
                    r.version = max(r.version, reply.policy_version)
            return msgspec.structs.replace(reply, request_id=request_id)

    def push_adapter(
        self,
        msg: m.PushAdapter,
        timeout_s: float | None = None,
        verify: Callable[[m.PushReply], None] | None = None,
    ) -> m.PushReply:
        """Push to every replica in rotation; return once all serve `msg.version`, each verified."""
        with self._lock:  # held throughout: a prober cannot rejoin mid-push at the old version
            self._check()
            targets = [r for r in self._replicas if r.state == SERVING]
            if not targets:
                raise ServerUnavailable(self._all_gone())
            body = _shared_body(msg, [r.client for r in targets])
            with ThreadPoolExecutor(len(targets), thread_name_prefix="gkd-push") as pool:
                futures = [
                    pool.submit(r.client.push_adapter, body, timeout_s=timeout_s, verify=verify)
                    for r in targets
                ]
                outcomes = [_outcome(f) for f in futures]
            replies: list[m.PushReply] = []
            for r, out in zip(targets, outcomes):
                if isinstance(out, BaseException) and _is_loss(out):
                    self._lose(r, str(out))
                elif isinstance(out, BaseException):
                    raise out
                else:
                    r.version = out.version
                    replies.append(out)
            if not replies:
                raise ServerUnavailable(self._all_gone())
            self._last_push = (msg, verify)
            return msgspec.structs.replace(replies[0], reload_s=max(x.reload_s for x in replies))

    def status(self, timeout_s: float | None = None) -> m.Status:
        """The set's status: version = newest in rotation; queue, tokens/s and counters summed."""
        deadline = time.monotonic() + (600.0 if timeout_s is None else timeout_s)
        with self._joined:
            self._check()
            while not self._serving() and not self._closed:
                if not self._joined.wait(max(0.0, deadline - time.monotonic())):
                    raise ServerUnavailable(self._all_gone())
                self._check()
        seen = [(r, st) for r, st in self._poll(timeout_s) if st is not None]
        if not seen:
            raise ServerUnavailable(self._all_gone())
        return _aggregate([st for _, st in seen])

    def close(self) -> None:
        with self._joined:
            self._closed = True
            self._joined.notify_all()
            clients = [r.client for r in self._replicas if r.client is not None]
            for r in self._replicas:
                r.client = None
        for c in clients:
            c.close()

    # ---- beyond one client: per-replica figures and events ------------------------------------

    def replica_figures(self, timeout_s: float | None = 10.0) -> list[dict[str, Any]]:
        """Per replica: state, version, queue depth, tokens/s (a fresh status of those serving)."""
        self._poll(timeout_s)
        with self._lock:
            return [
                {
                    "replica": r.url,
                    "state": r.state,
                    "policy_version": r.version,
                    "queue_depth": r.last.queue_depth if r.last and r.state == SERVING else None,
                    "tokens_per_s": r.last.tokens_per_s if r.last and r.state == SERVING else None,
                    "outstanding": r.outstanding,
                    "served": r.served,
                }
                for r in self._replicas
            ]

    def take_events(self) -> list[dict[str, Any]]:
        """replica_lost / replica_rejoined events since the last call (for metrics.jsonl)."""
        with self._lock:
            events, self._events = self._events, []
            return events

    # ---- internals (call with the lock held) ------------------------------------------------

    def _serving(self) -> list[Replica]:
        return [r for r in self._replicas if r.state == SERVING]

    def _pick(self, min_version: int = 0) -> Replica | None:
        serving = self._serving()
        behind = [
            r for r in serving if r.version < min_version and time.monotonic() - r.seen >= self._refresh_s
        ]
        if behind:
            self._refresh(behind)
            serving = self._serving()
        if not serving:
            return None
        ready = [r for r in serving if r.version >= min_version] or serving
        return min(ready, key=lambda r: (r.outstanding, r.served))

    def _refresh(self, replicas: list[Replica]) -> None:
        for r in replicas:
            try:
                st = r.client.status(10.0)
            except Exception as e:
                if not _is_loss(e):
                    raise
                self._lose(r, str(e))
                continue
            r.last, r.version, r.seen = st, st.policy_version, time.monotonic()

    def _place(self, p: _Pending) -> None:
        """Submit `p` to the best replica (p.replica stays None when there is none)."""
        while True:
            r = self._pick(getattr(p.req, "min_version", 0))
            if r is None:
                p.replica = None
                return
            self._seq += 1
            inner = f"{p.req.request_id}@{self._seq}"
            try:
                r.client.submit(msgspec.structs.replace(p.req, request_id=inner))
            except Exception as e:
                if not _is_loss(e):
                    raise
                self._lose(r, str(e))
                continue
            p.replica, p.inner = r, inner
            r.outstanding += p.work
            return

    def _forget(self, request_id: str, p: _Pending) -> None:
        if p.replica is not None:
            p.replica.outstanding -= p.work
        self._pending.pop(request_id, None)

    def _lose(self, r: Replica, why: str) -> None:
        """Take `r` out of rotation, move its work to the others, start its prober."""
        if r.state == LOST:
            return  # already lost; its prober is running
        old, r.client, r.state, r.outstanding = r.client, None, LOST, 0
        if old is not None:
            try:
                old.close()
            except Exception:  # noqa: BLE001 - a dead replica's client may fail to close; it is dropped anyway
                log.debug("closing the client of %s failed", r.url, exc_info=True)
        moved = [p for p in self._pending.values() if p.replica is r]
        for p in moved:
            p.replica = None
        log.warning(
            "rollout replica %s lost (%s); %d request(s) move to the %d other(s)",
            r.url,
            why,
            len(moved),
            len(self._serving()),
        )
        self._events.append(
            {
                "event": "replica_lost",
                "replica": r.url,
                "why": why,
                "moved_requests": len(moved),
                "replicas_serving": len(self._serving()),
            }
        )
        for p in moved:
            self._place(p)
        if not self._closed:
            threading.Thread(target=self._probe, args=(r,), name=f"gkd-probe-{r.url}", daemon=True).start()

    def _check(self) -> None:
        if self._closed:
            raise ServerUnavailable("the replica set is closed")
        if self._error is not None:
            raise self._error

    def _all_gone(self) -> str:
        return f"every rollout replica is gone ({', '.join(self.urls)})"

    def _poll(self, timeout_s: float | None) -> list[tuple[Replica, m.Status | None]]:
        """A status from every replica in rotation (None for one that was lost meanwhile)."""
        with self._lock:
            serving = self._serving()
        out = []
        for r in serving:
            try:
                st = r.client.status(timeout_s)
            except Exception as e:
                with self._lock:
                    if not _is_loss(e):
                        raise
                    if r.state == SERVING:
                        self._lose(r, str(e))
                out.append((r, None))
                continue
            with self._lock:
                r.last, r.version, r.seen = st, st.policy_version, time.monotonic()
            out.append((r, st))
        return out

    # ---- the prober (its own thread) --------------------------------------------------------

    def _probe(self, r: Replica) -> None:
        """Reconnect to r.url until it answers; bring it to the current version; rejoin."""
        client = None
        try:
            while not self._closed:
                try:
                    client = client or self._make(r.url)
                    st = client.status(timeout_s=2 * self._probe_s)
                    with self._lock:
                        last = self._last_push
                    version = st.policy_version
                    if last is not None:
                        msg, verify = last
                        version = client.push_adapter(msg, timeout_s=None, verify=verify).version
                    with self._joined:
                        if self._last_push is not last:
                            continue  # a newer push went out meanwhile: bring it to that one
                        if self._closed:
                            break
                        r.client, r.state, r.version, r.last, client = client, SERVING, version, st, None
                        r.seen = time.monotonic()
                        self._events.append(
                            {"event": "replica_rejoined", "replica": r.url, "policy_version": version}
                        )
                        self._joined.notify_all()
                    log.warning("rollout replica %s rejoined at policy version %d", r.url, version)
                    return
                except Exception as e:
                    if not _is_loss(e):
                        raise
                    if client is not None:
                        client.close()
                        client = None
                    time.sleep(self._probe_s)
        except BaseException as e:  # noqa: BLE001 - handed to the caller's thread, raised by its next call
            log.error("rollout replica %s could not rejoin: %s", r.url, e)
            with self._joined:
                self._error = e
                self._joined.notify_all()
        finally:
            if client is not None:
                client.close()


def _outcome(future: Any) -> Any:
    try:
        return future.result()
    except BaseException as e:  # noqa: BLE001 - sorted by the caller (lost vs hard error)
        return e


def _shared_body(msg: m.PushAdapter, clients: list[Any]) -> Any:
    """What each client is pushed: on Ray one object-store copy for all (`share`), else msg."""
    first = clients[0]
    share = getattr(first, "share", None)
    if share is not None and all(type(c) is type(first) for c in clients):
        return share(msg)
    return msg


def _aggregate(statuses: list[m.Status]) -> m.Status:
    first = statuses[0]
    return msgspec.structs.replace(
        first,
        policy_version=max(s.policy_version for s in statuses),
        queue_depth=sum(s.queue_depth for s in statuses),
        tokens_per_s=sum(s.tokens_per_s for s in statuses),
        last_reload_s=max(s.last_reload_s for s in statuses),
        healthy=all(s.healthy for s in statuses),
        uptime_s=min(s.uptime_s for s in statuses),
        served_requests=sum(s.served_requests for s in statuses),
        served_sequences=sum(s.served_sequences for s in statuses),
    )
