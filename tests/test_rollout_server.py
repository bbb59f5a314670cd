"""The rollout server as a process: real vLLM CPU engine, real ZeroMQ sockets, tiny real model.

Tests use two server configurations (the pool in conftest keeps two engines alive at most):
first the shared default server (merged mode), then one bound beyond loopback with a token in
lora mode (which test_wire.py reuses).
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import pytest
from conftest import REPO, hf_greedy, hf_logprobs

from shared.messages import GenerateRequest, Prompt, PushAdapter, SamplingSpec
from shared.transport import RemoteError, connect

PROMPTS = [[5, 17, 33, 40], [100, 101, 102], [7, 8, 9, 10, 11, 12], [250, 3, 77]]
CANARY = [11, 42, 7, 99, 150, 3, 260, 18, 64, 5]
FP32_TOL = 1e-3  # vLLM fp32 vs HF fp32 differ by up to 2.8e-5 (measured on the tiny models)
# shared with test_wire.py, test_bad_input.py and test_soak.py; tests push r=64 to see it refused
SECURE = {"host": "0.0.0.0", "token": "s3cret-token", "sync_mode": "lora", "max_lora_rank": 32}


def gen_request(
    rid: str = "",
    temperature: float = 0.0,
    max_new_tokens: int = 24,
    seed: int | None = None,
    min_version: int = 0,
) -> GenerateRequest:
    return GenerateRequest(
        request_id=rid,
        prompts=[Prompt(prompt_id=f"p{i}", token_ids=p) for i, p in enumerate(PROMPTS)],
        sampling=SamplingSpec(temperature=temperature, max_new_tokens=max_new_tokens, seed=seed),
        min_version=min_version,
    )


def assert_matches_hf(reply, model, max_new_tokens: int = 24) -> None:
    """Greedy server completions equal the HF model's greedy continuations."""
    expect = hf_greedy(model, PROMPTS, max_new_tokens)
    for c, e in zip(reply.completions, expect, strict=True):
        assert c.token_ids == e[: len(c.token_ids)], f"{c.prompt_id}: server {c.token_ids} != HF {e}"
        assert len(c.token_ids) == max_new_tokens or c.finish_reason == "stop"


# ---------------------------------------------------------------- fast: no engine


def test_cli_refuses_open_bind_without_token(tiny_models):
    t0 = time.monotonic()
    r = subprocess.run(
        [sys.executable, "-m", "rollout_server", "--model", str(tiny_models.student), "--host", "0.0.0.0"],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)},
        timeout=60,
    )
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "token" in lines[0], r.stderr
    assert time.monotonic() - t0 < 10


def test_cli_rejects_missing_model(tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "rollout_server", "--model", str(tmp_path / "nope")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and "no such directory" in r.stderr


def test_server_help_is_fast_and_light():
    code = (
        "import sys, time; t = time.perf_counter(); sys.argv = ['gkd-rollout-server', '--help']\n"
        "from rollout_server.cli import main\n"
        "try:\n    main()\nexcept SystemExit:\n    pass\n"
        "heavy = [m for m in ('torch', 'vllm', 'transformers') if m in sys.modules]\n"
        "sys.stderr.write(f'HEAVY={heavy} T={time.perf_counter() - t:.3f}')\n"
    )
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert time.monotonic() - t0 < 3.0
    assert "--sync_mode" in r.stdout and "--max_message_mb" in r.stdout
    assert "HEAVY=[]" in r.stderr, r.stderr


# ---------------------------------------------------------------- fast: the service's scheduling


class RecordingEngine:
    """Stands in for vLLM's AsyncLLM so the service's scheduling rules can be checked in
    milliseconds, without an engine start (the real engine is exercised by the slow tests below).
    It runs its coroutines on a loop thread of its own like the real one, fails loudly if a reload
    overlaps a running sequence, and answers with the number of reloads it has seen, so a reply's
    tokens show which weights produced them."""

    dtype_name = "float32"
    vocab_size = 384
    max_model_len = 1024
    alive = True

    def __init__(self, gen_s: float = 0.05):
        import asyncio

        self.gen_s = gen_s
        self.loads = 0
        self.live = 0  # sequences running now
        self.max_live = 0
        self.reloading = False
        self.loaded: list[tuple[str, bytes, float]] = []  # the payload of each reload
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()

    async def generate(self, prompt_id, ids, spec):
        import asyncio

        from shared.messages import Completion

        assert not self.reloading, "a sequence started during a reload"
        seen = self.loads
        self.live += 1
        self.max_live = max(self.max_live, self.live)
        try:
            await asyncio.sleep(self.gen_s)
        finally:
            self.live -= 1
        assert self.loads == seen, "weights changed under a running sequence"
        return Completion(
            prompt_id=prompt_id, token_ids=[seen, seen], logprobs=[-0.1, -0.2], finish_reason="length"
        )

    async def reload(self, kind, data, scale):
        import asyncio

        assert self.live == 0, "reload overlapped a running sequence"
        self.reloading = True
        await asyncio.sleep(0.01)
        self.loaded.append((kind, data, scale))
        self.loads += 1
        self.reloading = False

    async def score(self, ids):
        return [-1.0] * (len(ids) - 1)

    def close(self):
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)


@pytest.fixture
def local_service(tiny_models):
    from rollout_server.service import RolloutService
    from rollout_server.settings import ServerSettings

    made = []

    def make(gen_s: float = 0.05, **kw):
        engine = RecordingEngine(gen_s)
        svc = RolloutService(engine, ServerSettings(model=str(tiny_models.student), max_lora_rank=32, **kw))
        made.append((svc, engine))
        return svc, engine

    yield make
    for svc, engine in made:
        svc.close()
        engine.close()


def _small_request(rid: str, n: int = 2, min_version: int = 0) -> GenerateRequest:
    return GenerateRequest(
        request_id=rid,
        prompts=[Prompt(prompt_id=f"{rid}-{i}", token_ids=[5, 6]) for i in range(n)],
        sampling=SamplingSpec(max_new_tokens=2),
        min_version=min_version,
    )


def test_service_runs_requests_together_and_pushes_between_them(local_service, make_adapter):
    from shared.transport.inproc import InprocClient

    svc, engine = local_service(gen_s=0.5)
    c = InprocClient(service=svc, timeout_s=30)
    adapter = make_adapter(r=4, seed=0)
    first = c.submit(_small_request("a", n=3))
    time.sleep(0.1)  # "a" is in the engine now
    queued = [c.submit(_small_request(r, n=2)) for r in ("b", "c")]
    time.sleep(0.1)
    push = threading.Thread(target=lambda: c.push_adapter(adapter.push(1)))
    push.start()
    time.sleep(0.1)  # the push waits for a, b and c to finish
    late = c.submit(_small_request("d", n=1))
    replies = [c.result(r) for r in (first, *queued, late)]
    push.join()
    # Every prompt of a, b and c ran at once (each prompt is its own engine request, whatever
    # request it came in); the push ran after them; d waited for it and ran on the new weights.
    assert engine.max_live == 7
    assert [r.policy_version for r in replies] == [0, 0, 0, 1]
    for r in replies:
        assert all(comp.token_ids == [r.policy_version] * 2 for comp in r.completions)
    assert engine.loaded[0][0] == "lora" and engine.loaded[0][1] == adapter.data


def test_service_never_mixes_versions_under_concurrent_pushes(local_service, make_adapter):
    from shared.transport.inproc import InprocClient

    svc, engine = local_service(gen_s=0.02)
    adapter = make_adapter(r=4, seed=0)
    errors: list[BaseException] = []
    replies = []

    def worker(k: int) -> None:
        c = InprocClient(service=svc, timeout_s=30)
        try:
            for i in range(15):
                replies.append(c.generate(_small_request(f"w{k}-{i}", n=1 + i % 3)))
        except BaseException as e:  # noqa: BLE001 - reported by the assert below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    pusher = InprocClient(service=svc, timeout_s=30)
    for v in range(1, 6):
        assert pusher.push_adapter(adapter.push(v)).version == v
        time.sleep(0.03)
    for t in threads:
        t.join()
    assert not errors and len(replies) == 60
    for r in replies:  # every completion in a reply came from the weights its version names
        assert {tuple(comp.token_ids) for comp in r.completions} == {(r.policy_version,) * 2}
    assert {r.policy_version for r in replies} > {0}  # pushes really happened during generation


def _stub_worker(model_dir):
    """A stand-in for vLLM's worker with WorkerExt's methods: records what reload_weights gets."""
    import types

    import torch

    from rollout_server.worker_ext import WorkerExt

    class Stub(WorkerExt):
        def __init__(self):
            mapping = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}
            self.model_runner = types.SimpleNamespace(
                model=types.SimpleNamespace(packed_modules_mapping=mapping)
            )
            self.vllm_config = types.SimpleNamespace(
                model_config=types.SimpleNamespace(model=str(model_dir), dtype=torch.float32)
            )
            self.device = torch.device("cpu")
            self.loaded: list[dict] = []

        def reload_weights(self, weights_iterator, is_checkpoint_format):
            assert is_checkpoint_format
            self.loaded.append(dict(weights_iterator))

    w = Stub()
    w.gkd_setup("float32", "merged")
    return w


def test_worker_reload_sends_whole_fused_layers_and_restores_untouched_weights(tiny_models, make_adapter):
    import torch

    from shared.adapters import lora_pairs, merge_lora, scale_of, unpack

    w = _stub_worker(tiny_models.student)
    pristine = {k: v.clone() for k, v in w._gkd_pristine.items()}
    a1 = make_adapter(r=4, seed=0, targets=("q_proj", "down_proj"))
    w.gkd_apply("lora", a1.data, scale_of(a1.lora))
    first = w.loaded[-1]
    expect = merge_lora(pristine, lora_pairs(unpack(a1.data)), scale_of(a1.lora), torch.float32)
    # q_proj changes; k/v ride along (vLLM repacks the fused qkv layer only when it has all parts).
    for layer in range(2):
        pre = f"model.layers.{layer}"
        assert {f"{pre}.self_attn.{m}_proj.weight" for m in "qkv"} <= set(first)
        q = f"{pre}.self_attn.q_proj.weight"
        assert torch.equal(first[q], expect[q]) and not torch.equal(first[q], pristine[q])
        k = f"{pre}.self_attn.k_proj.weight"
        assert torch.equal(first[k], pristine[k])
        assert f"{pre}.mlp.gate_proj.weight" not in first
    a2 = make_adapter(r=4, seed=1, targets=("q_proj",))
    w.gkd_apply("lora", a2.data, scale_of(a2.lora))
    second = w.loaded[-1]
    # down_proj is no longer adapted: it must go back to the pristine weights.
    d = "model.layers.0.mlp.down_proj.weight"
    assert torch.equal(second[d], pristine[d])
    # An empty push restores everything the last one touched.
    w.gkd_apply("lora", b"", 0.0)
    q = "model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(w.loaded[-1][q], pristine[q])


def test_worker_full_push_then_lora_push_serves_base_plus_adapter(tiny_models, make_adapter):
    import torch

    from shared.adapters import pack, scale_of

    w = _stub_worker(tiny_models.student)
    up = "model.layers.1.mlp.up_proj.weight"
    norm = "model.layers.1.post_attention_layernorm.weight"
    new_up = torch.randn_like(w._gkd_pristine[up])
    new_norm = torch.full((128,), 0.5)
    w.gkd_apply("full", pack({up: new_up, norm: new_norm}), 0.0)
    got = w.loaded[-1]
    assert torch.equal(got[up], new_up) and torch.equal(got[norm], new_norm)
    assert "model.layers.1.mlp.gate_proj.weight" in got  # the fused gate_up layer, whole
    # A later LoRA push (another learner's, say) serves base + adapter: the merge starts from the
    # checkpoint's values, and the norm no LoRA touches comes back from the checkpoint on disk.
    a = make_adapter(r=4, seed=0, targets=("up_proj",))
    base = _stub_worker(tiny_models.student)
    base.gkd_apply("lora", a.data, scale_of(a.lora))
    w.gkd_apply("lora", a.data, scale_of(a.lora))
    assert not torch.equal(w._gkd_pristine[up], new_up)
    assert torch.equal(w.loaded[-1][up], base.loaded[-1][up])
    assert norm in w.loaded[-1] and not torch.equal(w.loaded[-1][norm], new_norm)
    assert torch.equal(w.loaded[-1][norm], torch.ones(128))  # the tiny checkpoint's norm weights are 1


def test_service_min_version_timeout_token_and_shutdown(local_service):
    from shared.messages import Envelope, StatusRequest, decode_reply, encode
    from shared.transport.inproc import InprocClient

    svc, _ = local_service(min_version_wait_s=0.3)
    c = InprocClient(service=svc, timeout_s=30)
    t0 = time.monotonic()
    with pytest.raises(RemoteError) as e:
        c.generate(_small_request("future", min_version=3))
    assert e.value.code == "version_timeout" and time.monotonic() - t0 < 5
    got: list[bytes] = []
    svc.handle_bytes(b"\x80\x04garbage", got.append)
    assert decode_reply(got[0]).code == "bad_request"

    locked, _ = local_service(host="0.0.0.0", token="tok")
    with pytest.raises(RemoteError, match="unauthorized"):
        InprocClient(service=locked, token="nope").status()
    assert InprocClient(service=locked, token="tok").status().healthy
    locked.handle_bytes(encode(Envelope(token="tok", body=StatusRequest())), got.append)
    assert decode_reply(got[-1]).policy_version == 0

    pending = c.submit(_small_request("late", min_version=9))
    svc.close()
    with pytest.raises(RemoteError) as e:
        c.result(pending)
    assert e.value.code in ("unavailable", "version_timeout")


# ---------------------------------------------------------------- the shared default server


@pytest.mark.slow
def test_round_trip(rollout_server, hf_student):
    with rollout_server.client() as c:
        ids = [c.submit(gen_request(rid=f"greedy-{i}")) for i in range(2)]
        sampled = c.submit(gen_request(rid="sampled", temperature=0.9, seed=7))
        again = c.submit(gen_request(rid="sampled-again", temperature=0.9, seed=7))
        # Collect out of order: replies are matched by request id.
        r_again, r_sampled = c.result(again), c.result(sampled)
        greedy = [c.result(i) for i in reversed(ids)]
    for r in (*greedy, r_sampled, r_again):
        assert r.policy_version == 0
        assert [x.prompt_id for x in r.completions] == [f"p{i}" for i in range(len(PROMPTS))]
        for comp in r.completions:
            assert len(comp.logprobs) == len(comp.token_ids) > 0
            assert comp.finish_reason in ("stop", "length")
            assert all(lp <= 0.0 for lp in comp.logprobs)
    assert greedy[0].request_id == "greedy-1" and greedy[1].request_id == "greedy-0"
    assert_matches_hf(greedy[0], hf_student)
    # Same seed, same sampling -> same tokens; and sampling differs from greedy somewhere.
    assert [x.token_ids for x in r_sampled.completions] == [x.token_ids for x in r_again.completions]
    assert [x.token_ids for x in r_sampled.completions] != [x.token_ids for x in greedy[0].completions]


@pytest.mark.slow
def test_bad_generate_requests_are_refused(rollout_server):
    too_long = GenerateRequest(
        request_id="long",
        prompts=[Prompt(prompt_id="x", token_ids=[5] * 1020)],
        sampling=SamplingSpec(max_new_tokens=16),
    )
    out_of_vocab = GenerateRequest(request_id="oov", prompts=[Prompt(prompt_id="x", token_ids=[5, 10**6])])
    empty = GenerateRequest(request_id="empty", prompts=[Prompt(prompt_id="x", token_ids=[])])
    with rollout_server.client() as c:
        for req, words in ((too_long, "max_model_len"), (out_of_vocab, "vocabulary"), (empty, "empty")):
            with pytest.raises(RemoteError) as e:
                c.generate(req)
            assert e.value.code == "bad_request" and words in e.value.message
        assert c.generate(gen_request(max_new_tokens=4)).policy_version == 0  # still serving


@pytest.mark.slow
def test_corrupt_adapters_are_rejected_and_previous_version_keeps_serving(rollout_server, make_adapter):
    import torch

    from shared.adapters import pack, sha256_hex, unpack

    good = make_adapter(r=8, seed=0)
    tensors = unpack(good.data)
    a_name = next(n for n in tensors if "q_proj.lora_A" in n)
    b_name = a_name.replace("lora_A", "lora_B")

    def push_of(edit) -> PushAdapter:
        t = dict(tensors)
        edit(t)
        data = pack(t)
        return PushAdapter(version=1, adapter=data, sha256=sha256_hex(data), lora=good.lora)

    def rename(t: dict) -> None:  # a module the model does not have
        t[a_name.replace("q_proj", "zz_proj")] = t.pop(a_name)
        t[b_name.replace("q_proj", "zz_proj")] = t.pop(b_name)

    cases = {
        "bad checksum": (
            PushAdapter(version=1, adapter=good.data, sha256="0" * 64, lora=good.lora),
            "checksum",
        ),
        "wrong shape": (push_of(lambda t: t.__setitem__(a_name, torch.zeros(8, 77))), "invalid_adapter"),
        "unknown module": (push_of(rename), "invalid_adapter"),
        "missing lora_B": (push_of(lambda t: t.pop(b_name)), "invalid_adapter"),
        "nan values": (
            push_of(lambda t: t.__setitem__(a_name, torch.full_like(t[a_name], float("nan")))),
            "invalid_adapter",
        ),
        "rank above max": (make_adapter(r=128, seed=0).push(1), "invalid_adapter"),
        "not safetensors": (
            PushAdapter(version=1, adapter=b"junk", sha256=sha256_hex(b"junk"), lora=good.lora),
            "invalid_adapter",
        ),
        "version not above serving": (good.push(0), "bad_version"),
    }
    with rollout_server.client() as c:
        before = c.generate(gen_request())
        for name, (msg, code) in cases.items():
            with pytest.raises(RemoteError) as e:
                c.push_adapter(msg)
            assert e.value.code == code, f"{name}: {e.value}"
            assert e.value.message, name
        st = c.status()
        after = c.generate(gen_request())
    assert st.policy_version == 0 and st.healthy and st.last_reload_s == 0.0
    assert after.policy_version == 0
    assert [x.token_ids for x in after.completions] == [x.token_ids for x in before.completions]


@pytest.mark.slow
def test_push_reloads_in_place_and_matches_hf_merged(rollout_server, make_adapter):
    """Merged mode. Leaves the server at version 2 (the pool restarts it for the next user)."""
    v1 = make_adapter(r=8, seed=1, targets=("q_proj", "v_proj", "down_proj"))
    # v2 touches other modules: down_proj must go back to pristine, k/gate get merged.
    v2 = make_adapter(r=16, seed=2, targets=("q_proj", "k_proj", "gate_proj"))
    with rollout_server.client() as c:
        base = c.generate(gen_request())
        pid_before = rollout_server.pid
        r1 = c.push_adapter(v1.push(1, CANARY))
        assert (r1.version, r1.serving_dtype) == (1, "float32") and r1.reload_s > 0
        assert (
            max(abs(a - b) for a, b in zip(r1.canary_logprobs, hf_logprobs(v1.merged, CANARY), strict=True))
            < FP32_TOL
        )
        g1 = c.generate(gen_request())
        assert g1.policy_version == 1
        assert_matches_hf(g1, v1.merged)
        assert [x.token_ids for x in g1.completions] != [
            x.token_ids for x in base.completions
        ]  # the push changed outputs

        # A request that needs version 2 waits for it; it is counted in the queue meanwhile.
        waiting = c.submit(gen_request(rid="needs-v2", min_version=2))
        deadline = time.monotonic() + 10
        while c.status().queue_depth < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert c.status().queue_depth == 1
        r2 = c.push_adapter(v2.push(2, CANARY))
        g2 = c.result(waiting)
        assert r2.version == 2 and g2.policy_version == 2
        assert (
            max(abs(a - b) for a, b in zip(r2.canary_logprobs, hf_logprobs(v2.merged, CANARY), strict=True))
            < FP32_TOL
        )
        assert_matches_hf(g2, v2.merged)

        # Re-pushing the serving adapter (a learner reconnecting) is an idempotent no-op.
        again = c.push_adapter(v2.push(2, CANARY))
        assert (
            again.version == 2
            and again.reload_s == 0.0
            and again.canary_logprobs == pytest.approx(r2.canary_logprobs, abs=1e-6)
        )
        with pytest.raises(RemoteError) as e:
            c.push_adapter(v1.push(2))  # same version, other bytes
        assert e.value.code == "bad_version"
        st = c.status()
    assert st.policy_version == 2 and st.healthy and st.queue_depth == 0
    assert (
        0 < st.last_reload_s < 30
        and st.tokens_per_s > 0
        and st.sync_mode == "merged"
        and st.dtype == "float32"
    )
    assert rollout_server.alive() and rollout_server.pid == pid_before  # reloaded in place, no restart


# ---------------------------------------------------------------- bound beyond loopback, token, lora mode


@pytest.fixture
def secure_server(server_pool):
    return server_pool.get(**SECURE)


@pytest.mark.slow
def test_token_is_required_beyond_loopback(secure_server):
    for token in (None, "", "wrong-token", SECURE["token"] + "x"):
        with connect(secure_server.url, token=token, timeout_s=60) as c:
            for call in (c.status, lambda: c.generate(gen_request(max_new_tokens=2))):
                with pytest.raises(RemoteError) as e:
                    call()
                assert e.value.code == "unauthorized"
    with connect(secure_server.url, token=SECURE["token"], timeout_s=60) as c:
        assert c.status().healthy
        assert c.generate(gen_request(max_new_tokens=2)).policy_version == 0
    # The HTTP endpoint asks for the same token: tests/test_openai_http.py.


@pytest.mark.slow
def test_lora_mode_round_trip_and_push(secure_server, make_adapter, hf_student):
    v1 = make_adapter(r=8, seed=3, targets=("q_proj", "v_proj", "down_proj"))
    with secure_server.client() as c:
        base = c.generate(gen_request())
        assert base.policy_version == 0
        assert_matches_hf(base, hf_student)
        r1 = c.push_adapter(v1.push(1, CANARY))
        assert r1.version == 1
        assert (
            max(abs(a - b) for a, b in zip(r1.canary_logprobs, hf_logprobs(v1.merged, CANARY), strict=True))
            < FP32_TOL
        )
        g1 = c.generate(gen_request())
        assert g1.policy_version == 1
        assert_matches_hf(g1, v1.merged)
        assert [x.token_ids for x in g1.completions] != [x.token_ids for x in base.completions]
        st = c.status()
    assert st.sync_mode == "lora" and st.policy_version == 1 and st.last_reload_s > 0
