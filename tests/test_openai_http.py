"""`--http_port`: vLLM's own OpenAI server on the rollout engine, through the `openai` client.

Two server starts: the default pool server (merged mode, loopback, no token) and the secure one
(`--host 0.0.0.0`, a token, lora mode). Each server's tests are one class
(pytest-randomly shuffles within a class but keeps classes whole), so the pool starts each once. A push test pushes
the next version, and no test needs version 0.
"""

from __future__ import annotations

import socket
import threading
import time
import urllib.error
import urllib.request

import pytest
from test_rollout_server import PROMPTS, SECURE

from shared.messages import GenerateRequest, Prompt, SamplingSpec

pytestmark = pytest.mark.slow

CHAT = [{"role": "user", "content": "write a short poem"}]


def openai_client(srv, token: str | None = None):
    from openai import OpenAI

    return OpenAI(
        base_url=f"http://127.0.0.1:{srv.http_port}/v1", api_key=token or "unused", timeout=120, max_retries=0
    )


def http_status(srv, path: str, token: str | None = None, body: bytes | None = None) -> int:
    req = urllib.request.Request(f"http://127.0.0.1:{srv.http_port}{path}", data=body)
    if body is not None:
        req.add_header("Content-Type", "application/json")
    if token is not None:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def greedy_pair(srv, client, max_tokens: int = 16) -> tuple[list[list[int]], list[list[int]], int]:
    """Greedy completions of PROMPTS (token ids) over HTTP and over ZeroMQ on the same server:
    (http token ids, zmq token ids, the policy version both replies say produced them)."""
    http, versions = [], set()
    for p in PROMPTS:
        raw = client.completions.with_raw_response.create(
            model="student",
            prompt=p,
            max_tokens=max_tokens,
            temperature=0,
            extra_body={"return_token_ids": True},
        )
        versions.add(int(raw.headers["x-gkd-policy-version"]))
        http.append(list(raw.parse().choices[0].model_extra["token_ids"]))
    req = GenerateRequest(
        request_id="greedy",
        prompts=[Prompt(prompt_id=f"p{i}", token_ids=p) for i, p in enumerate(PROMPTS)],
        sampling=SamplingSpec(temperature=0.0, max_new_tokens=max_tokens),
    )
    with srv.client() as c:
        reply = c.generate(req)
    assert versions == {reply.policy_version}
    return http, [list(x.token_ids) for x in reply.completions], reply.policy_version


# ---------------------------------------------------------------- loopback server (merged mode)


class TestLoopback:
    """The default pool server: merged mode, loopback, no token."""

    @pytest.fixture
    def server(self, server_pool):
        return server_pool.get(fresh=False)

    def test_models_lists_the_served_model_and_loopback_needs_no_token(self, server):
        assert [m.id for m in openai_client(server).models.list().data] == ["student"]
        assert http_status(server, "/v1/models") == 200  # no Authorization header at all
        assert http_status(server, "/health") == 200
        # Only the OpenAI routes: vLLM's admin routes would change the engine behind the service.
        assert http_status(server, "/scale_elastic_ep", body=b"{}") == 404
        assert http_status(server, "/v1/load_lora_adapter", body=b"{}") == 404
        # A body over --max_message_mb is refused from its Content-Length, before it is sent.
        too_big = server.args["max_message_mb"] * 1024 * 1024 + 1
        with socket.create_connection(("127.0.0.1", server.http_port), timeout=60) as sock:
            sock.sendall(
                f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: {too_big}\r\n\r\n".encode()
            )
            assert sock.recv(4096).startswith(b"HTTP/1.1 413")

    def test_stream_yields_many_chunks_and_the_same_text(self, server):
        client = openai_client(server)
        kw = dict(
            model="student", messages=CHAT, max_tokens=16, temperature=0, extra_body={"ignore_eos": True}
        )
        chunks = list(client.chat.completions.create(stream=True, **kw))
        pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
        assert len(pieces) > 1
        whole = client.chat.completions.create(**kw)
        assert "".join(pieces) == whole.choices[0].message.content
        assert whole.usage.completion_tokens == 16

    def test_n2_returns_two_choices(self, server):
        client = openai_client(server)
        r = client.completions.create(
            model="student", prompt="the sun", max_tokens=8, n=2, temperature=1.0, seed=3
        )
        assert sorted(c.index for c in r.choices) == [0, 1]
        chat = client.chat.completions.create(
            model="student", messages=CHAT, max_tokens=8, n=2, temperature=1.0
        )
        assert len(chat.choices) == 2

    def test_logprobs_come_back(self, server):
        client = openai_client(server)
        chat = client.chat.completions.create(
            model="student", messages=CHAT, max_tokens=8, temperature=0, logprobs=True, top_logprobs=2
        )
        content = chat.choices[0].logprobs.content
        assert len(content) == chat.usage.completion_tokens == 8 or chat.choices[0].finish_reason == "stop"
        assert content and all(t.logprob <= 0 and len(t.top_logprobs) == 2 for t in content)
        comp = client.completions.create(
            model="student", prompt="the sun", max_tokens=6, temperature=0, logprobs=1
        )
        lps = comp.choices[0].logprobs.token_logprobs
        assert len(lps) == comp.usage.completion_tokens > 0 and all(lp <= 0 for lp in lps)

    def test_http_and_rollouts_are_the_same_engine(self, server):
        http, zmq, _ = greedy_pair(server, openai_client(server))
        assert http == zmq

    def test_a_rollout_is_not_blocked_by_a_long_stream(self, server):
        rollout = GenerateRequest(
            request_id="rollout",
            prompts=[Prompt(prompt_id="p0", token_ids=PROMPTS[0])],
            sampling=SamplingSpec(max_new_tokens=8),
        )
        with server.client() as c:
            c.generate(rollout)  # warm
            t0 = time.perf_counter()
            c.generate(rollout)
            alone_s = time.perf_counter() - t0
        first_chunk, done, n_chunks = threading.Event(), threading.Event(), []

        def stream() -> None:
            try:
                s = openai_client(server).chat.completions.create(
                    model="student",
                    messages=CHAT,
                    max_tokens=900,  # the chat prompt is short; max_model_len is 1024
                    temperature=0,
                    stream=True,
                    extra_body={"ignore_eos": True},
                )
                for chunk in s:
                    n_chunks.append(chunk)
                    first_chunk.set()
            finally:
                first_chunk.set()
                done.set()

        t = threading.Thread(target=stream, daemon=True)
        t_stream = time.perf_counter()
        t.start()
        assert first_chunk.wait(120)
        assert not done.is_set(), "the stream ended before the rollout was sent"
        with server.client() as c:
            t0 = time.perf_counter()
            reply = c.generate(rollout)
            during_s = time.perf_counter() - t0
        answered_first = not done.is_set()
        t.join(300)
        stream_s = time.perf_counter() - t_stream
        assert done.is_set() and len(n_chunks) > 100
        assert 0 < len(reply.completions[0].token_ids) <= 8  # EOS may end it early (after a push)
        assert answered_first, f"the rollout ({during_s:.2f} s; {alone_s:.2f} s alone) waited for the stream"
        print(f"rollout alone {alone_s:.3f} s, during a 900-token stream ({stream_s:.2f} s) {during_s:.3f} s")

    def test_http_serves_the_pushed_weights_merged(self, server, make_adapter):
        before, _, v0 = greedy_pair(server, openai_client(server))
        with server.client() as c:
            assert c.push_adapter(make_adapter(r=8, seed=5).push(v0 + 1)).version == v0 + 1
        http, zmq, version = greedy_pair(server, openai_client(server))
        assert version == v0 + 1 and http == zmq and http != before


# ---------------------------------------------------------------- beyond loopback, token, lora mode


class TestBeyondLoopback:
    """--host 0.0.0.0 with a token, lora mode (the pool's SECURE server)."""

    @pytest.fixture
    def secure(self, server_pool):
        return server_pool.get(fresh=False, **SECURE)

    def test_token_is_required_beyond_loopback(self, secure):
        from openai import AuthenticationError

        chat = b'{"model": "student", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}'
        for token in (None, "wrong-token", SECURE["token"] + "x"):
            assert http_status(secure, "/v1/models", token) == 401
            assert http_status(secure, "/v1/chat/completions", token, chat) == 401
            assert http_status(secure, "/v1/completions", token, b'{"prompt": "a", "max_tokens": 2}') == 401
        with pytest.raises(AuthenticationError):
            openai_client(secure).models.list()
        assert http_status(secure, "/v1/models", SECURE["token"]) == 200
        assert http_status(secure, "/v1/chat/completions", SECURE["token"], chat) == 200
        client = openai_client(secure, SECURE["token"])
        assert [m.id for m in client.models.list().data] == ["student"]
        assert http_status(secure, "/health") == 200  # liveness stays open, as in vLLM

    def test_http_serves_the_current_lora(self, secure, make_adapter):
        client = openai_client(secure, SECURE["token"])
        before, zmq0, v0 = greedy_pair(secure, client)  # v0: earlier tests may have pushed
        assert before == zmq0
        adapter = make_adapter(r=8, seed=3, targets=("q_proj", "v_proj", "down_proj"))
        with secure.client() as c:
            assert c.push_adapter(adapter.push(v0 + 1)).version == v0 + 1
        http, zmq, version = greedy_pair(secure, client)
        assert version == v0 + 1 and http == zmq and http != before
