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
from typing import Any

import msgspec

from rollout_server.settings import ServerSettings, flag_specs, problems, with_sync_mode

PROG = "gkd-rollout-server"
log = logging.getLogger("gkd.rollout_server")


def build_parser():
    from shared.config import Parser

    p = Parser(
        prog=PROG,
        description="The GKD rollout server: vLLM samples the student and reloads pushed LoRA adapters in place.",
        argument_default=None,
    )
    for flags, kw in flag_specs(shown={"token": "default: $GKD_TOKEN"}):
        p.add_argument(*flags, **kw)
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
    errors = problems(s)
    if errors:
        raise _Exit(errors[0])
    s = msgspec.structs.replace(s, model=resolve_model(s.model))
    s = with_sync_mode(s)
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
            from rollout_server.http import HttpServer

            try:
                http = HttpServer(s.host, s.http_port)
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
            try:
                http.start(
                    engine,
                    service,
                    served_name=s.role,
                    token=s.token,
                    max_bytes=s.max_message_mb * 1024 * 1024,
                )
            except Exception as e:  # noqa: BLE001 - one line at the process edge
                log.debug("http start failed", exc_info=True)
                raise _Exit(
                    f"the OpenAI endpoint on --http_port {s.http_port} failed to start: {e}"
                ) from None
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
