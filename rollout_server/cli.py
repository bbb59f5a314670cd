"""`gkd-rollout-server`: parse and check the settings, bind the ports, then start the engine.

Thin on purpose: only the standard library, msgspec and pyzmq are imported before the flags are
checked, so `--help` and every bad-flag error answer at once; torch and vLLM come after.
Any failure at this edge is one line on stderr and exit code 2.
"""

from __future__ import annotations

import faulthandler
import logging
import os
import re
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, get_type_hints

import msgspec

from rollout_server.settings import ServerSettings

PROG = "gkd-rollout-server"
log = logging.getLogger("gkd.rollout_server")

HELP = {
    "model": "Student base model: a local HF directory (safetensors) or a hub id.",
    "host": "Bind address. Anything but loopback requires --token.",
    "port": "ZeroMQ port: the learner connects to tcp://host:port.",
    "token": "Shared secret required on every request (default: env GKD_TOKEN).",
    "sync_mode": "merged: merge each pushed adapter into the base weights and reload in place; lora: vLLM LoRA hot-loading.",
    "dtype": "Serving dtype; auto = float32 on CPU (exact canary), bfloat16 on CUDA.",
    "max_model_len": "Longest prompt + completion, in tokens (default: the model's own limit).",
    "gpu_memory_utilization": "CUDA only: share of GPU memory vLLM may use.",
    "kv_cache_gb": "CPU only: KV cache size in GiB.",
    "max_lora_rank": "Largest adapter rank accepted.",
    "max_message_mb": "Messages larger than this are refused before they are buffered.",
    "http_port": "Serve an OpenAI-compatible endpoint on this port (off by default).",
    "enforce_eager": "No CUDA graphs / torch.compile: faster start (default: on for CPU, off on GPU).",
    "tensor_parallel_size": "GPUs per engine (vLLM tensor parallelism).",
    "pristine_dtype": "dtype of each worker's pristine copy of the adaptable weights (merged mode).",
    "seed": "Engine seed.",
    "trust_remote_code": "Allow custom modelling code from the model repo.",
    "max_num_seqs": "Sequences decoded together per engine step.",
    "min_version_wait_s": "How long a request asking for a newer policy version waits for its push.",
    "role": "student: sample the student and take adapter pushes; teacher: a frozen teacher that answers score requests and refuses pushes.",
    "max_logprobs": "Largest top-k a score request may ask for (vLLM's max_logprobs).",
}


def build_parser():
    from shared.config import Parser, argkw

    p = Parser(
        prog=PROG,
        description="The GKD rollout server: vLLM samples the student and reloads pushed LoRA adapters in place.",
        argument_default=None,
    )
    defaults = {f.name: f.default for f in msgspec.structs.fields(ServerSettings)}
    for name, typ in get_type_hints(ServerSettings).items():
        default = defaults.get(name, msgspec.NODEFAULT)
        shown = "required" if default is msgspec.NODEFAULT else f"default: {default!r}"
        if name == "token":
            shown = "default: $GKD_TOKEN"
        flags = [f"--{name}"] + ([f"--{name.replace('_', '-')}"] if "_" in name else [])
        p.add_argument(*flags, dest=name, help=f"{HELP.get(name, '')} ({shown})", **argkw(typ))
    p.add_argument(
        "--log_level",
        default="INFO",
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="Our log level (vLLM's: VLLM_LOGGING_LEVEL).",
    )
    return p


def parse_settings(argv: list[str] | None) -> tuple[ServerSettings, str]:
    ns = vars(build_parser().parse_args(argv))
    level = ns.pop("log_level")
    given = {k: v for k, v in ns.items() if v is not None}
    if "token" not in given and os.environ.get("GKD_TOKEN"):
        given["token"] = os.environ["GKD_TOKEN"]
    if "model" not in given:
        raise _Exit("--model is required: a local model directory or a hub id")
    try:
        return msgspec.convert(given, ServerSettings), level
    except msgspec.ValidationError as e:
        raise _Exit(f"invalid setting: {e}") from None


def check(s: ServerSettings) -> ServerSettings:
    """Everything that can be checked before the engine starts; returns settings with a local model dir."""
    if s.needs_token() and not s.token:
        raise _Exit(
            f"--host {s.host} is beyond loopback: refusing to serve without a token; pass --token or set GKD_TOKEN"
        )
    for name in ("port", "http_port"):
        v = getattr(s, name)
        if v is not None and not 0 < v < 65536:
            raise _Exit(f"--{name}={v} is invalid: must be in [1, 65535]")
    if s.http_port is not None and s.http_port == s.port:
        raise _Exit(f"--http_port must differ from --port ({s.port})")
    positive = {
        "max_model_len": 1 if s.max_model_len is None else s.max_model_len,
        "tensor_parallel_size": s.tensor_parallel_size,
        "kv_cache_gb": s.kv_cache_gb,
        "max_message_mb": s.max_message_mb,
        "max_num_seqs": s.max_num_seqs,
        "min_version_wait_s": s.min_version_wait_s,
        "max_logprobs": s.max_logprobs,
    }
    for name, v in positive.items():
        if not v > 0:
            raise _Exit(f"--{name}={v} is invalid: must be > 0")
    if not 1 <= s.max_lora_rank <= 512:
        raise _Exit(
            f"--max_lora_rank={s.max_lora_rank} is invalid: must be in [1, 512] (vLLM's largest LoRA rank is 512)"
        )
    if not 0 < s.gpu_memory_utilization <= 1:
        raise _Exit(f"--gpu_memory_utilization={s.gpu_memory_utilization} is invalid: must be in (0, 1]")
    s = msgspec.structs.replace(s, model=resolve_model(s.model))
    from rollout_server.engine import model_context_len

    limit = model_context_len(s.model)
    if s.max_model_len is not None and limit is not None and s.max_model_len > limit:
        raise _Exit(
            f"--max_model_len {s.max_model_len} is above the model's own limit ({limit} tokens); "
            "lower it, or omit --max_model_len to use the model's limit"
        )
    return s


def resolve_model(model: str) -> str:
    """A local directory with config.json and safetensors; hub ids are fetched (or read from cache)."""
    path = Path(model).expanduser()
    if not path.exists():
        if not re.fullmatch(r"[\w.-]+/[\w.-]+", model) or model.startswith("."):
            raise _Exit(f"--model {model!r}: no such directory; give a model directory or a hub id")
        try:
            from huggingface_hub import snapshot_download

            path = Path(
                snapshot_download(
                    model, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"]
                )
            )
        except Exception as e:  # noqa: BLE001 - many network/hub error types; one line for the user
            raise _Exit(
                f"--model {model!r}: not a local directory and cannot be fetched from the hub ({type(e).__name__}); give a local path"
            ) from None
    if not path.is_dir():
        raise _Exit(f"--model {model!r} is not a directory")
    if not (path / "config.json").is_file() or not any(path.glob("*.safetensors")):
        raise _Exit(f"--model {model!r}: expected config.json and *.safetensors weights in the directory")
    return str(path.resolve())


class _Exit(Exception):
    """A problem to report as one line, exit code 2."""


def main(argv: list[str] | None = None) -> int:
    try:
        settings, level = parse_settings(argv)
        _setup_logging(level)
        code = serve(check(settings))
    except _Exit as e:
        sys.stderr.write(f"{PROG}: error: {e}\n")
        return 2
    except KeyboardInterrupt:
        return 130
    # Everything is closed. Skip the interpreter's final garbage collection: over the object graph
    # vLLM leaves behind it takes ~30 s of CPU (measured), which would stall every restart.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def serve(s: ServerSettings) -> int:
    from rollout_server.zmq_server import PortInUse, Starting, ZmqServer

    # Bind before the engine starts (20-90 s on CPU), so a taken port fails at once; until the
    # engine is up, every request gets a one-line "starting" error (clients retry on it).
    try:
        zmq_server = ZmqServer(s.host, s.port, s.max_message_mb * 1024 * 1024)
    except (PortInUse, OSError) as e:
        raise _Exit(str(e)) from None
    stop = threading.Event()
    _on_signals(stop)
    zmq_thread = threading.Thread(
        target=zmq_server.serve, args=(Starting(s.model), stop), name="gkd-zmq", daemon=True
    )
    zmq_thread.start()
    http = None
    resources: list[Any] = []
    try:
        if s.http_port is not None:
            from rollout_server.openai_api import OpenAIServer

            try:
                http = OpenAIServer(s.host, s.http_port, s.token, s.max_message_mb * 1024 * 1024)
            except OSError as e:
                raise _Exit(
                    f"--http_port {s.http_port} on {s.host}: {e.strerror or e}; pick another port"
                ) from None
            resources.append(http)
        t0 = time.perf_counter()
        from rollout_server.engine import AsyncEngine, EngineStartError

        try:
            engine = AsyncEngine(s)
        except EngineStartError as e:
            log.debug("engine start failed", exc_info=True)
            raise _Exit(str(e)) from None
        resources.append(engine)
        from rollout_server.service import RolloutService

        service = RolloutService(engine, s)
        resources.insert(0, service)
        if http is not None:
            http.start(service)
        zmq_server.set_service(service)
        extra = f", OpenAI endpoint http://{s.host}:{s.http_port}/v1" if http else ""
        log.info(
            "ready on %s (model %s, %s, sync_mode %s, max_model_len %d, engine start %.1f s%s)",
            zmq_server.url,
            s.model,
            engine.dtype_name,
            s.sync_mode,
            engine.max_model_len,
            time.perf_counter() - t0,
            extra,
        )
        while not stop.wait(0.5):
            if not zmq_thread.is_alive():
                raise _Exit("the ZeroMQ loop stopped unexpectedly; see the log above")
        log.info("stopping")
        return 0
    finally:
        stop.set()
        zmq_thread.join(5)
        # The service first (its requests use the engine), then transports, then the engine.
        for r in [*resources[:1], zmq_server, *resources[1:]]:
            log.debug("closing %s", type(r).__name__)
            try:
                r.close()
            except Exception:  # noqa: BLE001 - best effort at exit
                log.debug("close failed", exc_info=True)


def _on_signals(stop: threading.Event) -> None:
    def handler(signum: int, _frame: Any) -> None:
        if stop.is_set():  # a second signal: leave now
            os._exit(128 + signum)
        stop.set()

    # `kill -USR1 <pid>` dumps every thread's stack to stderr: how to see where a server hangs.
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


def _setup_logging(level: str) -> None:
    h = logging.StreamHandler(sys.stderr)
    h.setFormatter(logging.Formatter(f"{PROG}: %(message)s"))
    lg = logging.getLogger("gkd")
    lg.handlers[:] = [h]
    lg.setLevel(level)
    lg.propagate = False


if __name__ == "__main__":
    sys.exit(main())
