"""Shared fixtures: tiny real models, a tiny dataset, real rollout-server processes, real adapters.

Engine starts are the expensive part (20-90 s on 2 CPU cores), so rollout servers come from one
session-wide pool that keeps at most POOL_SIZE (2) server processes alive. A test asks for a
configuration; the pool reuses a running server when the configuration matches and it is still at
policy version 0 (or the test does not need that), and otherwise starts the right one, stopping
the least recently used server (by process group) to make room.

Fixtures:
- tiny_models (session): TinyModels(student, teacher) directories sharing one tokenizer.
- tiny_dataset (session): a 32-row prompt/completion jsonl file.
- rollout_server: a running `gkd-rollout-server` (merged mode, loopback, no token) at policy
  version 0; a ServerProc with .url, .pid, .port, .http_port, .token, .args.
- server_pool (session): pool.get(**flags) for other configurations (e.g. sync_mode="lora").
- make_adapter (session): build a real PEFT LoRA on the tiny student (random lora_B so it changes
  outputs), packed for the wire, plus the HF model with that adapter merged.
- free_port: a function returning a free loopback TCP port.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import pytest

from shared import procs

REPO = Path(__file__).resolve().parent.parent

# Settings of the shared default server. Small limits on purpose: tests exercise them. One set for
# the server tests, the learner tests (the seed's r=64 fits) and the 128-prompt load test, so that
# they share one engine.
DEFAULT_SERVER_FLAGS: dict[str, Any] = {
    "max_model_len": 1024,
    "kv_cache_gb": 1,
    "max_lora_rank": 64,  # tests push r=128 to see it refused
    "max_num_seqs": 128,
    "max_message_mb": 2,  # tests send 3+ MB to see it refused (tiny adapters are KBs)
    "min_version_wait_s": 60,
}


class TinyModels(NamedTuple):
    student: Path
    teacher: Path


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> TinyModels:
    from shared.tiny import build_pair

    student, teacher = build_pair(tmp_path_factory.mktemp("tiny_models"))
    return TinyModels(Path(student), Path(teacher))


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from shared.tiny import write_dataset

    return write_dataset(tmp_path_factory.mktemp("tiny_data") / "train.jsonl", n=32)


@pytest.fixture(scope="session")
def free_port():
    return procs.free_port


# ---------------------------------------------------------------- rollout server processes


@dataclass
class ServerProc:
    """A `gkd-rollout-server` subprocess started by the tests (stopped by PID, never by name)."""

    args: dict[str, Any]
    port: int
    http_port: int | None
    token: str | None
    log_path: Path
    proc: subprocess.Popen = field(repr=False)

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def url(self) -> str:
        return f"tcp://127.0.0.1:{self.port}"

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def client(self, **kw: Any):
        from shared.transport.zmq_client import ZmqClient

        kw.setdefault("token", self.token)
        kw.setdefault("timeout_s", 120.0)
        return ZmqClient(self.url, **kw)

    def stop(self, timeout_s: float = 30.0) -> int | None:
        return procs.stop(self.proc, grace_s=timeout_s)


def start_server(model: Path, log_path: Path, *, ready_timeout_s: float = 400.0, **flags: Any) -> ServerProc:
    """Start `python -m rollout_server` on free loopback ports and wait for its 'ready' line."""
    flags = dict(flags)
    port = flags.pop("port", None) or procs.free_port()
    http_port = flags.get("http_port")
    cmd = [sys.executable, "-m", "rollout_server", "--model", str(model), "--port", str(port)]
    for k, v in flags.items():
        cmd += [f"--{k}", str(v)]
    env = {"VLLM_CPU_KVCACHE_SPACE": "1", "PYTHONPATH": str(REPO), "GKD_TOKEN": None}
    proc = procs.start(cmd, log_path, env, cwd=REPO)
    srv = ServerProc(
        args=flags, port=port, http_port=http_port, token=flags.get("token"), log_path=log_path, proc=proc
    )
    try:
        procs.wait_for_line(proc, log_path, "gkd-rollout-server: ready", ready_timeout_s, "rollout server")
    except procs.ProcessFailed as e:
        srv.stop()
        pytest.fail(str(e))
    return srv


# Live pool servers at most. Two: the suite's two configurations (DEFAULT_SERVER_FLAGS and
# test_rollout_server.SECURE) then stay up across modules in any order, and two idle tiny engines
# fit this machine (2 cores, 24 GiB) beside a learner. Tests that start engines of
# their own call server_pool.shrink(1), server_pool.stop() or get(..., alone=True) first.
POOL_SIZE = int(os.environ.get("GKD_TEST_POOL_SIZE", "2"))


class ServerPool:
    """Up to POOL_SIZE live servers keyed by their flags; the least recently used one is stopped
    to make room. A server is reused while its flags match and (fresh) it is still at version 0."""

    def __init__(self, model: Path, log_dir: Path, size: int = POOL_SIZE):
        self.model = model
        self.log_dir = log_dir
        self.size = max(1, size)
        self.live: list[tuple[dict[str, Any], ServerProc]] = []  # least recently used first
        self.starts = 0

    def get(self, *, fresh: bool = True, alone: bool = False, **flags: Any) -> ServerProc:
        """A live server with DEFAULT_SERVER_FLAGS overridden by `flags` (fresh: at version 0;
        alone: every other pool server is stopped, for tests that start engines of their own)."""
        want = {**DEFAULT_SERVER_FLAGS, **flags}
        found = next(((k, s) for k, s in self.live if k == want), None)
        if found is not None:
            self.live.remove(found)
            if found[1].alive() and (not fresh or self._version(found[1]) == 0):
                self.live.append(found)
                if alone:
                    self.shrink(1)
                return found[1]
            found[1].stop()
        self.shrink(0 if alone else self.size - 1)
        args = dict(want)
        args.setdefault("http_port", procs.free_port())  # every server also serves the OpenAI endpoint
        self.starts += 1
        srv = start_server(self.model, self.log_dir / f"server-{self.starts}.log", **args)
        self.live.append((want, srv))
        return srv

    def replace(self, old: ServerProc, new: ServerProc) -> None:
        """`new` (same flags and port, restarted by a test) takes `old`'s place in the pool."""
        self.live = [(k, new if s is old else s) for k, s in self.live]

    def _version(self, srv: ServerProc) -> int:
        with srv.client(timeout_s=30) as c:
            return c.status().policy_version

    def shrink(self, keep: int) -> None:
        """Stop the least recently used servers until at most `keep` are live."""
        while len(self.live) > keep:
            self.live.pop(0)[1].stop()

    def stop(self) -> None:
        self.shrink(0)


@pytest.fixture(scope="session")
def server_pool(tiny_models: TinyModels, tmp_path_factory: pytest.TempPathFactory):
    pool = ServerPool(tiny_models.student, tmp_path_factory.mktemp("server_logs"))
    yield pool
    pool.stop()


@pytest.fixture
def rollout_server(server_pool: ServerPool) -> ServerProc:
    """The shared default server (merged mode, loopback, no token), at policy version 0.

    It lives for the whole session unless a test needs another configuration or pushed to it.
    """
    return server_pool.get()


# ---------------------------------------------------------------- adapters


@dataclass
class BuiltAdapter:
    data: bytes  # safetensors bytes, PEFT names (what the learner pushes)
    sha256: str
    lora: Any  # shared.messages.LoraSpec
    merged: Any  # HF model with the adapter merged (peft merge_and_unload), fp32, eval mode

    def push(self, version: int, canary_ids: list[int] | None = None):
        from shared.messages import PushAdapter

        return PushAdapter(
            version=version,
            adapter=self.data,
            sha256=self.sha256,
            lora=self.lora,
            canary_ids=list(canary_ids or []),
        )


def build_adapter(
    student: Path,
    *,
    r: int = 8,
    seed: int = 0,
    targets: tuple[str, ...] = ("q_proj", "v_proj", "down_proj"),
    scale_b: float = 0.3,
) -> BuiltAdapter:
    import torch
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
    from transformers import AutoModelForCausalLM

    from shared.adapters import pack, sha256_hex
    from shared.messages import LoraSpec

    model = AutoModelForCausalLM.from_pretrained(str(student), dtype=torch.float32)
    peft_model = get_peft_model(
        model, LoraConfig(r=r, lora_alpha=2 * r, target_modules=list(targets), lora_dropout=0.0)
    )
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:  # PEFT initialises B to zero: a no-op adapter would prove nothing
                p.copy_(torch.randn(p.shape, generator=gen) * scale_b)
    data = pack(get_peft_model_state_dict(peft_model))
    merged = peft_model.merge_and_unload().eval()
    return BuiltAdapter(
        data=data,
        sha256=sha256_hex(data),
        lora=LoraSpec(r=r, lora_alpha=2 * r, target_modules=list(targets)),
        merged=merged,
    )


@pytest.fixture(scope="session")
def make_adapter(tiny_models: TinyModels):
    """make_adapter(r=8, seed=0, targets=(...)) -> BuiltAdapter on the tiny student."""

    def make(**kw: Any) -> BuiltAdapter:
        return build_adapter(tiny_models.student, **kw)

    return make


def hf_greedy(model: Any, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    """Greedy continuations from a HF model (EOS does not stop, like vLLM's token budget)."""
    import torch

    out = []
    with torch.no_grad():
        for p in prompts:
            ids = model.generate(
                torch.tensor([p]),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                eos_token_id=None,
                pad_token_id=0,
            )
            out.append(ids[0, len(p) :].tolist())
    return out


def hf_logprobs(model: Any, ids: list[int]) -> list[float]:
    """log p(ids[i] | ids[:i]) for i >= 1 (what the server's canary returns)."""
    import torch

    with torch.no_grad():
        lp = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
    return [lp[i - 1, ids[i]].item() for i in range(1, len(ids))]


@pytest.fixture(scope="session")
def hf_student(tiny_models: TinyModels):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(tiny_models.student), dtype=torch.float32).eval()


# ---------------------------------------------------------------- fault injection (test_faults.py, test_bad_input.py)

# A TCP relay run as its own process (`python -c RELAY_SRC LISTEN_PORT TARGET_PORT CORRUPT_TAG`):
# the learner talks to it as if it were the server. Killing it with SIGKILL is, from the learner's
# side, a server that died and never returns. With a CORRUPT_TAG it flips one byte in the middle of
# the first ZeroMQ message frame (learner -> server) that contains those bytes, e.g. the msgpack tag
# "push_adapter": corruption in transit, which the adapter's sha256 must catch. Matching the tag, not
# a size, keeps it on the push whatever the adapter's size. It parses ZMTP 3 framing (64-byte
# greeting, then frames of flags + 1- or 8-byte length + body) and forwards everything else untouched.
RELAY_SRC = r"""
import socket, sys, threading
listen, target, corrupt_tag = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3].encode()

class Corrupter:
    def __init__(self):
        self.buf, self.greeting_left, self.done = bytearray(), 64, not corrupt_tag

    def feed(self, data):
        if self.done:
            return data
        self.buf += data
        out = bytearray()
        while not self.done:
            if self.greeting_left:
                n = min(self.greeting_left, len(self.buf))
                out += self.buf[:n]; del self.buf[:n]; self.greeting_left -= n
                if self.greeting_left:
                    break
                continue
            if len(self.buf) < 2:
                break
            flags = self.buf[0]
            head = 9 if flags & 0x02 else 2
            if len(self.buf) < head:
                break
            size = int.from_bytes(self.buf[1:9], "big") if flags & 0x02 else self.buf[1]
            if len(self.buf) < head + size:
                break
            frame = self.buf[:head + size]; del self.buf[:head + size]
            if not flags & 0x04 and corrupt_tag in frame[head:]:
                frame[head + size // 2] ^= 0xFF
                self.done = True
                print("relay: corrupted a frame of", size, "bytes", flush=True)
            out += frame
        if self.done:
            out += self.buf; self.buf.clear()
        return bytes(out)

def pipe(src, dst, corrupter):
    try:
        while True:
            data = src.recv(1 << 16)
            if not data:
                break
            dst.sendall(corrupter.feed(data) if corrupter else data)
    except OSError:
        pass
    for s in (src, dst):
        try:
            s.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

srv = socket.socket()
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("127.0.0.1", listen))
srv.listen(16)
print("relay ready", flush=True)
while True:
    client, _ = srv.accept()
    try:
        upstream = socket.create_connection(("127.0.0.1", target))
    except OSError:
        client.close()
        continue
    threading.Thread(target=pipe, args=(client, upstream, Corrupter()), daemon=True).start()
    threading.Thread(target=pipe, args=(upstream, client, None), daemon=True).start()
"""


@dataclass
class Relay:
    port: int
    proc: subprocess.Popen = field(repr=False)

    @property
    def url(self) -> str:
        return f"tcp://127.0.0.1:{self.port}"

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def output(self) -> str:
        return self.proc.stdout.read() if self.proc.poll() is not None else ""


def start_relay(target_port: int, *, corrupt_tag: str = "") -> Relay:
    port = procs.free_port()
    proc = subprocess.Popen(
        [sys.executable, "-c", RELAY_SRC, str(port), str(target_port), corrupt_tag],
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    if proc.stdout.readline().strip() != "relay ready":
        proc.kill()
        pytest.fail("relay did not start")
    return Relay(port, proc)


@pytest.fixture
def relay():
    """relay(target_port, corrupt_tag="") -> Relay; every relay started is killed at teardown."""
    started: list[Relay] = []

    def make(target_port: int, **kw: Any) -> Relay:
        started.append(start_relay(target_port, **kw))
        return started[-1]

    yield make
    for r in started:
        r.kill()


def learner_argv(models: TinyModels, dataset: Path, out: Path, url: str, *extra: str) -> list[str]:
    """`python -m learner` with learner_flags."""
    return [sys.executable, "-m", "learner", *learner_flags(models, dataset, out, url, *extra)]


def learner_flags(models: TinyModels, dataset: Path, out: Path, url: str, *extra: str) -> list[str]:
    """The learner's flags on the tiny models: small batches, short completions, every step logged.
    Later flags override earlier ones (argparse), so `extra` can change any of these."""
    return [
        "--model_name_or_path",
        str(models.student),
        "--teacher_model_name_or_path",
        str(models.teacher),
        "--dataset_name",
        str(dataset),
        "--output_dir",
        str(out),
        "--rollout_url",
        url,
        "--per_device_train_batch_size",
        "2",
        "--gradient_accumulation_steps",
        "2",
        "--max_new_tokens",
        "16",
        "--max_length",
        "128",
        "--logging_steps",
        "1",
        "--learning_rate",
        "1e-3",
        "--use_peft",
        "--lora_r",
        "8",
        "--lora_alpha",
        "16",
        "--request_timeout_s",
        "120",
        *extra,
    ]


def learner_env() -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "TOKENIZERS_PARALLELISM": "false"}
    env.pop("GKD_TOKEN", None)
    env.pop("GKD_ROLLOUT_URL", None)
    return env


def start_learner(argv: list[str], log_path: Path) -> subprocess.Popen:
    """Start a learner process (its own session, stdout+stderr to log_path); stop it by PID."""
    return procs.start(argv, log_path, learner_env(), cwd=REPO)


def kill_pid(proc: subprocess.Popen) -> None:
    """SIGKILL one process we started (by its PID: a crash), reap it, then SIGKILL what is left of
    its process group: a rollout server's vLLM EngineCore and Worker outlive a SIGKILLed parent
    (reparented to init, ~2.5 GB and a polling thread each), and would weigh on every later test."""
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait(30)
    with contextlib.suppress(ProcessLookupError, PermissionError):  # the group is gone already
        os.killpg(proc.pid, signal.SIGKILL)


def last_line(text: str) -> str:
    """The last non-empty line (progress bars end their updates with \\r, not \\n)."""
    lines = [x.strip() for x in text.replace("\r", "\n").splitlines() if x.strip()]
    return lines[-1] if lines else ""
