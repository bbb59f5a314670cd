"""Soak: 4 concurrent clients for 60 s against one rollout server, adapters pushed while
generation runs. Every request gets a complete, version-tagged answer or a clear error; nothing
hangs (a per-request timeout); the server's memory stays flat. Prints the server's RSS at the start
and the end of the measured window.

Reuses the pool's SECURE server (lora sync mode, token), which test_rollout_server.py leaves
running and test_wire.py reuses; every push makes vLLM load a new LoRA, which is what would leak.
"""

from __future__ import annotations

import math
import os
import random
import threading
import time

import psutil
import pytest
from test_rollout_server import SECURE

from shared.messages import GenerateReply, GenerateRequest, Prompt, SamplingSpec
from shared.transport import RemoteError, ServerUnavailable

WARMUP_S = 10.0  # load before the first RSS sample: lazy allocations, the first LoRA loads
SOAK_S = float(os.environ.get("GKD_SOAK_S", "60"))  # measured window
REQUEST_TIMEOUT_S = 60.0  # a request without an answer by then counts as hung
PUSH_EVERY_S = 2.0
RSS_FACTOR, RSS_SLACK_MB = 1.2, 50


@pytest.fixture
def server(server_pool):
    return server_pool.get(fresh=False, **SECURE)


def rss_bytes(pid: int) -> int:
    """The server's resident memory, children included (the engine may run in a child process)."""
    p = psutil.Process(pid)
    return p.memory_info().rss + sum(c.memory_info().rss for c in p.children(recursive=True))


class Tally:
    def __init__(self):
        self.lock = threading.Lock()
        self.ok = 0
        self.pushes = 0
        self.errors: list[str] = []  # clear errors (ErrorReply): allowed, counted, must be one line
        self.failures: list[str] = []  # anything else: a hang, a malformed answer, a wrong version
        self.max_pushed = 0  # highest version a PushReply confirmed

    def fail(self, msg: str) -> None:
        with self.lock:
            self.failures.append(msg)


def check_reply(reply, req: GenerateRequest, versions_before: int, tally: Tally) -> None:
    """Complete and version-tagged: every prompt answered in order, lengths consistent, a plausible version."""
    s = req.sampling
    problems = []
    if not isinstance(reply, GenerateReply) or reply.request_id != req.request_id:
        problems.append(f"wrong reply {type(reply).__name__}")
    elif [c.prompt_id for c in reply.completions] != [p.prompt_id for p in req.prompts]:
        problems.append("completions do not match the prompts")
    else:
        with tally.lock:
            newest = tally.max_pushed
        if not (
            req.min_version <= reply.policy_version and versions_before <= reply.policy_version <= newest + 1
        ):
            # newest + 1: a push may be serving before its PushReply reached the pusher
            problems.append(
                f"policy version {reply.policy_version} outside [{max(req.min_version, versions_before)}, {newest + 1}]"
            )
        for c in reply.completions:
            n = len(c.token_ids)
            if not (1 <= n <= s.max_new_tokens and len(c.logprobs) == n):
                problems.append(
                    f"{c.prompt_id}: {n} tokens, {len(c.logprobs)} logprobs, max {s.max_new_tokens}"
                )
            elif c.finish_reason not in ("stop", "length") or (
                c.finish_reason == "length" and n != s.max_new_tokens
            ):
                problems.append(
                    f"{c.prompt_id}: finish_reason {c.finish_reason!r} with {n}/{s.max_new_tokens} tokens"
                )
            elif not all(math.isfinite(x) and x <= 1e-4 for x in c.logprobs):
                problems.append(f"{c.prompt_id}: logprobs not in (-inf, 0]")
    if problems:
        tally.fail(f"{req.request_id}: {'; '.join(problems)}")


def generate_loop(server, name: str, stop: threading.Event, tally: Tally, seed: int) -> None:
    rng = random.Random(seed)
    with server.client(timeout_s=REQUEST_TIMEOUT_S) as c:
        n = 0
        while not stop.is_set():
            n += 1
            with tally.lock:
                known = tally.max_pushed
            prompts = [
                Prompt(
                    prompt_id=f"{name}-{n}-{i}",
                    token_ids=[rng.randrange(3, 380) for _ in range(rng.randint(2, 40))],
                )
                for i in range(rng.randint(1, 6))
            ]
            req = GenerateRequest(
                request_id=f"{name}-{n}",
                prompts=prompts,
                sampling=SamplingSpec(
                    temperature=rng.choice([0.0, 0.9]),
                    max_new_tokens=rng.randint(1, 48),
                    seed=rng.randrange(1 << 30),
                ),
                min_version=known if rng.random() < 0.3 else 0,
            )
            try:
                reply = c.generate(req)
            except RemoteError as e:  # a clear refusal is allowed; it must be one line
                with tally.lock:
                    tally.errors.append(str(e))
                if "\n" in str(e) or not e.message:
                    tally.fail(f"{req.request_id}: unclear error {e!r}")
                continue
            except ServerUnavailable as e:
                tally.fail(f"{req.request_id}: no answer ({e})")
                return
            check_reply(reply, req, known, tally)
            with tally.lock:
                tally.ok += 1


def push_loop(server, adapters, stop: threading.Event, tally: Tally) -> None:
    """The fourth client: pushes a new adapter version every PUSH_EVERY_S while the others generate."""
    with server.client(timeout_s=REQUEST_TIMEOUT_S) as c:
        version = c.status().policy_version
        with tally.lock:
            tally.max_pushed = version
        i = 0
        while not stop.wait(PUSH_EVERY_S):
            version += 1
            try:
                reply = c.push_adapter(adapters[i % len(adapters)].push(version, canary_ids=[11, 42, 7, 99]))
            except (RemoteError, ServerUnavailable) as e:
                tally.fail(f"push {version}: {e}")
                return
            if reply.version != version or len(reply.canary_logprobs) != 3:
                tally.fail(f"push {version}: reply {reply}")
            with tally.lock:
                tally.max_pushed, tally.pushes = version, tally.pushes + 1
            i += 1


@pytest.mark.slow
def test_soak_four_clients_with_pushes(server, make_adapter):
    adapters = [make_adapter(r=8, seed=s) for s in (11, 12, 13)]
    tally, stop = Tally(), threading.Event()
    threads = [
        threading.Thread(target=generate_loop, args=(server, f"gen{k}", stop, tally, k), daemon=True)
        for k in range(3)
    ]
    threads.append(threading.Thread(target=push_loop, args=(server, adapters, stop, tally), daemon=True))
    for t in threads:
        t.start()
    time.sleep(WARMUP_S)
    rss_start, ok_start, t0 = rss_bytes(server.pid), tally.ok, time.monotonic()
    samples = [rss_start]
    while time.monotonic() - t0 < SOAK_S and not tally.failures:
        time.sleep(min(10.0, SOAK_S - (time.monotonic() - t0)))
        samples.append(rss_bytes(server.pid))
    stop.set()
    for t in threads:
        t.join(REQUEST_TIMEOUT_S + 10)
    elapsed = time.monotonic() - t0
    rss_end = rss_bytes(server.pid)
    hung = [t.name for t in threads if t.is_alive()]
    print(
        f"\nsoak: {elapsed:.0f} s measured (+{WARMUP_S:.0f} s warm-up), {tally.ok} answers ({tally.ok - ok_start} in the window), "
        f"{tally.pushes} pushes, {len(tally.errors)} clear errors, {len(tally.failures)} failures; "
        f"server RSS start {rss_start / 2**20:.1f} MiB, end {rss_end / 2**20:.1f} MiB "
        f"(every 10 s: {', '.join(f'{x / 2**20:.0f}' for x in samples)})"
    )
    assert not hung, f"threads still waiting: {hung}"
    assert not tally.failures, tally.failures[:5]
    assert tally.pushes >= SOAK_S / PUSH_EVERY_S / 2 and tally.ok - ok_start >= 20  # it really was under load
    assert len(tally.errors) <= 0.05 * tally.ok, tally.errors[:5]
    assert rss_end <= rss_start * RSS_FACTOR + RSS_SLACK_MB * 2**20, (
        f"server RSS grew from {rss_start / 2**20:.0f} to {rss_end / 2**20:.0f} MiB"
    )
    with server.client(timeout_s=30) as c:
        st = c.status()
    assert server.alive() and st.healthy and st.policy_version == tally.max_pushed
