"""An OpenAI-compatible HTTP endpoint onto the live student (`--http_port`).

It shares the rollout engine: each HTTP request becomes one exclusive job on the service's engine
thread (between rollout batches), so it always answers with the policy version serving at that
moment, and the reply says which (`policy_version`). Chat prompts go through the tokenizer's chat
template. Streaming and n > 1 are not offered.

Stdlib `ThreadingHTTPServer`: a chat endpoint for a person watching training needs no more, and it
adds no dependency. Bound beyond loopback, every /v1 request needs `Authorization: Bearer <token>`.
"""

from __future__ import annotations

import hmac
import json
import logging
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

log = logging.getLogger("gkd.rollout_server")

MODEL_ID = "student"  # the name /v1/models lists; any model name in a request is accepted


class HttpError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.kind = status, kind


class OpenAIServer:
    def __init__(self, host: str, port: int, token: str | None, max_bytes: int):
        """Bind now, so a taken port fails before the engine starts (raises OSError)."""
        self._httpd = ThreadingHTTPServer((host, port), _Handler)
        self._httpd.daemon_threads = True
        self._httpd.app = self  # type: ignore[attr-defined]
        self.token = token.encode() if token else None
        self.max_bytes = max_bytes
        self.service: Any = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return self._httpd.server_address[1]

    def start(self, service: Any) -> None:
        self.service = service
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.2}, name="gkd-http", daemon=True
        )
        self._thread.start()

    def close(self) -> None:
        if self._thread is not None:
            self._httpd.shutdown()
        self._httpd.server_close()

    # ---- request handling (HTTP threads) ---------------------------------------------------

    def models(self) -> dict:
        return {
            "object": "list",
            "data": [{"id": MODEL_ID, "object": "model", "created": 0, "owned_by": "gkd-service"}],
        }

    def complete(self, body: dict, chat: bool) -> dict:
        from shared.messages import SamplingSpec

        if body.get("stream"):
            raise HttpError(400, "stream=true is not supported by this endpoint")
        if int(body.get("n", 1) or 1) != 1:
            raise HttpError(400, "only n=1 is supported")
        if chat:
            messages = body.get("messages")
            if not isinstance(messages, list) or not messages:
                raise HttpError(400, "'messages' must be a non-empty list")
        else:
            prompt = body.get("prompt")
            if isinstance(prompt, list) and len(prompt) == 1:
                prompt = prompt[0]
            if not isinstance(prompt, str):
                raise HttpError(400, "'prompt' must be a string")
        max_tokens = body.get("max_completion_tokens") or body.get("max_tokens") or 128
        try:
            spec = SamplingSpec(
                temperature=float(body.get("temperature", 1.0)),
                top_p=float(body.get("top_p", 1.0)),
                max_new_tokens=int(max_tokens),
                seed=None if body.get("seed") is None else int(body["seed"]),
            )
        except (TypeError, ValueError) as e:
            raise HttpError(400, f"bad sampling parameter: {e}") from None
        if not (spec.temperature >= 0 and 0 < spec.top_p <= 1 and spec.max_new_tokens >= 1):
            raise HttpError(400, "need temperature >= 0, 0 < top_p <= 1, max_tokens >= 1")
        max_len = self.service.engine.max_model_len

        async def job(engine: Any) -> tuple[int, str, Any]:
            # Tokenize on the engine loop too: one thread owns the tokenizer.
            tok = engine.tokenizer
            text = (
                tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
                if chat
                else prompt
            )
            ids = tok.encode(text, add_special_tokens=not chat)
            if len(ids) >= max_len:
                raise HttpError(400, f"prompt of {len(ids)} tokens does not fit max_model_len {max_len}")
            s = (
                spec
                if len(ids) + spec.max_new_tokens <= max_len
                else _replace(spec, max_new_tokens=max_len - len(ids))
            )
            out_text, comp = await engine.generate_text(ids, s)
            return len(ids), out_text, comp

        (n_prompt, text, comp), version = self.service.run_on_engine(job, timeout_s=600)
        usage = {
            "prompt_tokens": n_prompt,
            "completion_tokens": len(comp.token_ids),
            "total_tokens": n_prompt + len(comp.token_ids),
        }
        base = {
            "id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}",
            "created": int(time.time()),
            "model": body.get("model") or MODEL_ID,
            "usage": usage,
            "policy_version": version,
        }
        if chat:
            choice = {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "finish_reason": comp.finish_reason,
                "logprobs": None,
            }
            return {**base, "object": "chat.completion", "choices": [choice]}
        return {
            **base,
            "object": "text_completion",
            "choices": [{"index": 0, "text": text, "finish_reason": comp.finish_reason, "logprobs": None}],
        }


def _replace(spec: Any, **kw: Any) -> Any:
    import msgspec

    return msgspec.structs.replace(spec, **kw)


class _Handler(BaseHTTPRequestHandler):
    server_version = "gkd-rollout-server"
    protocol_version = "HTTP/1.1"

    def log_message(self, fmt: str, *args: Any) -> None:  # route access logs to our logger
        log.debug("http %s - " + fmt, self.client_address[0], *args)

    @property
    def app(self) -> OpenAIServer:
        return self.server.app  # type: ignore[attr-defined]

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        self._dispatch(lambda: self._get())

    def do_POST(self) -> None:  # noqa: N802
        self._dispatch(lambda: self._post())

    def _get(self) -> dict:
        path = self.path.split("?")[0].rstrip("/")
        if path == "/health":
            st = self.app.service.status()
            if not st.healthy:
                raise HttpError(503, "engine unhealthy", "server_error")
            return {"status": "ok", "policy_version": st.policy_version}
        self._auth()
        if path == "/v1/models":
            return self.app.models()
        raise HttpError(404, f"no route {path}")

    def _post(self) -> dict:
        path = self.path.split("?")[0].rstrip("/")
        self._auth()
        if path not in ("/v1/chat/completions", "/v1/completions"):
            raise HttpError(404, f"no route {path}")
        length = self.headers.get("Content-Length")
        if length is None:
            raise HttpError(411, "Content-Length required")
        if int(length) > self.app.max_bytes:
            raise HttpError(413, f"body of {length} bytes is over the server's --max_message_mb")
        try:
            body = json.loads(self.rfile.read(int(length)) or b"{}")
        except (ValueError, UnicodeDecodeError) as e:
            raise HttpError(400, f"body is not JSON: {e}") from None
        if not isinstance(body, dict):
            raise HttpError(400, "body must be a JSON object")
        return self.app.complete(body, chat=path.endswith("chat/completions"))

    def _auth(self) -> None:
        want = self.app.token
        if want is None:
            return
        got = self.headers.get("Authorization", "")
        if not hmac.compare_digest(got.removeprefix("Bearer ").strip().encode(), want):
            raise HttpError(401, "missing or wrong bearer token", "authentication_error")

    def _dispatch(self, fn: Any) -> None:
        try:
            status, payload = 200, fn()
        except HttpError as e:
            status, payload = e.status, {"error": {"message": str(e), "type": e.kind, "code": e.status}}
        except Exception as e:  # noqa: BLE001 - a failed request must not kill the server
            log.exception("http request failed")
            status, payload = (
                500,
                {"error": {"message": f"internal error: {e}", "type": "server_error", "code": 500}},
            )
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if status != 200:  # the body may be unread: don't reuse this connection
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self.wfile.write(data)
