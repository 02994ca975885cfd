"""Serve a model over HTTP: OpenAI's chat and completions API (streamed or not) and a one-page chat in the
browser, from any model directory minillm loads.

    python -m minillm.serve --model runs/demo/orpo/model            # then open http://127.0.0.1:8000/
    curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \\
         -d '{"model": "runs/demo/orpo/model", "messages": [{"role": "user", "content": "Tere!"}]}'

Endpoints: POST /v1/chat/completions (messages rendered by the model's own chat template, the `render`
SFT trained with), POST /v1/completions (a raw prompt), GET /v1/models, GET /health, GET / (the chat page).
Requests are decoded together with continuous batching (minillm.batching). The server binds 127.0.0.1
unless --host says otherwise: it has no authentication.

The stack is the standard library's ThreadingHTTPServer: one thread per connection, which only parses,
renders and waits on a queue, while one decoding thread runs the model; no dependency to install, and the
server-sent events of `stream: true` are plain chunked HTTP/1.1.
"""
from __future__ import annotations

import json
import sys
import time
import traceback
import typing
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import torch

from minillm.batching import Engine, Job
from minillm.chat_format import TEMPLATES, resolve_template, stop_ids
from minillm.generate import Sequence
from minillm.hf import load_pretrained
from minillm.openai_api import ApiError, GenerationRequest, chunk, new_id, parse_request, response
from minillm.options import cli, parse_options, require_option
from minillm.tokenizer import load_tokenizer

PAGE = Path(__file__).parent / "static" / "chat.html"
MAX_BODY_BYTES = 8 * 1024 * 1024
JSON_TYPE = "application/json"


@dataclass(kw_only=True)
class ServeOptions:
    model: str  # Hugging Face layout directory (a minillm export, or a Llama / Mistral / Qwen2 model)
    host: str = "127.0.0.1"  # address to listen on; 0.0.0.0 opens the server (which has no authentication) to the network
    port: int = 8000  # TCP port; 0 = any free port (the URL printed at start says which)
    name: str = ""  # the model name clients send and /v1/models lists; '' = --model as given
    template: typing.Literal[TEMPLATES] = "auto"  # chat layout of /v1/chat/completions; auto = the model's own (see minillm.chat_format)
    max_batch_size: int = 16  # requests decoded together; more wait in arrival order
    max_tokens: int = 512  # reply length of a request that sets no max_tokens (capped by the context left)

    def check(self):
        require_option(0 <= self.port <= 65535, "port", self.port, "must be in 0..65535")
        require_option(self.max_batch_size >= 1, "max_batch_size", self.max_batch_size, "must be at least 1")
        require_option(self.max_tokens >= 1, "max_tokens", self.max_tokens, "must be at least 1")


class ModelServer(ThreadingHTTPServer):
    """The HTTP server and what its handlers share: the engine, the tokenizer, the chat layout."""
    daemon_threads = True  # a client that keeps its connection open never holds the process at exit

    def __init__(self, address, model, tokenizer, template: str | None, name: str, args: ServeOptions):
        self.engine = None  # started once the socket is bound (a failed bind closes the server at once)
        super().__init__(address, Handler)
        self.model, self.tokenizer, self.template, self.name, self.args = model, tokenizer, template, name, args
        self.created = int(time.time())
        self.page = PAGE.read_bytes()
        control = set(tokenizer.control_ids)
        model_eos = set(model.config.eos_ids or [model.config.eos_id])
        # A reply ends at any end id or layout marker; a raw completion at any end id. Either way at any
        # control token, so that one is never returned as text.
        layout_stops = set(stop_ids(tokenizer, template)) if template else set()
        self.completion_stops = frozenset({*tokenizer.eos_ids, *model_eos, *control} - {None})
        self.chat_stops = frozenset(self.completion_stops | layout_stops)
        self.engine = Engine(model, args.max_batch_size).start()

    def server_close(self):
        super().server_close()
        if self.engine is not None:
            self.engine.stop()

    def model_card(self) -> dict:
        return {"id": self.name, "object": "model", "created": self.created, "owned_by": "minillm",
                "max_model_len": self.model.config.max_seq_len, "chat_layout": self.template}


class ClientGone(Exception):
    """The client closed its connection mid-answer."""


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, and chunked transfer for streamed answers
    server: ModelServer
    timeout = 300  # seconds a silent client may hold its connection

    # ------------------------------------------------------------------ plumbing
    def log_message(self, format, *args):  # noqa: A002 -- the base class's signature
        sys.stderr.write(f"{self.address_string()} {format % args}\n")

    def send_json(self, status: int, obj: dict):
        data = json.dumps(obj, ensure_ascii=False).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", JSON_TYPE)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def send_error(self, code, message=None, explain=None):
        """The base class's errors (a malformed request line, an unknown method) in OpenAI's shape too."""
        self.close_connection = True
        self.request_version = "HTTP/1.1"  # a garbled request line still gets a status line, not a bare body
        self.send_json(code, ApiError(code, message or HTTPStatus(code).phrase).body())

    def send_error_json(self, error: ApiError):
        self.send_json(error.status, error.body())

    def write_chunk(self, data: bytes):
        try:
            self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
            self.wfile.flush()
        except OSError:  # BrokenPipe, ConnectionReset: the client left (the page's stop button, say)
            raise ClientGone from None

    def read_json(self):
        """The request body as JSON, or ApiError (411, 413, 400)."""
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            raise ApiError(411, "send the body with a Content-Length (chunked requests are not supported)")
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            raise ApiError(411, "a request body with a Content-Length header is required") from None
        if length < 0 or length > MAX_BODY_BYTES:
            self.close_connection = True  # the unread body must not be taken for the next request
            raise ApiError(413, f"the request body may have at most {MAX_BODY_BYTES} bytes, got {length}")
        raw = self.rfile.read(length)
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ApiError(400, f"the request body is not valid UTF-8 (byte {e.start})") from None
        try:
            return json.loads(text, parse_constant=reject_constant)
        except (json.JSONDecodeError, ValueError) as e:
            raise ApiError(400, f"malformed JSON in the request body: {e}") from None

    def guarded(self, handle):
        """Run a handler so that nothing a request sends can take the server down: an ApiError is its 4xx,
        anything else a 500 in the same shape (and the traceback in the server's log)."""
        try:
            handle()
        except ApiError as e:
            self.send_error_json(e)
        except ClientGone:
            self.close_connection = True
        except Exception as e:  # noqa: BLE001 -- the server outlives any one request
            self.log_error("%s", f"internal error: {type(e).__name__}: {e}")
            traceback.print_exc()
            try:
                self.send_error_json(ApiError(500, f"internal error: {type(e).__name__}", kind="server_error"))
            except OSError:
                self.close_connection = True

    # ------------------------------------------------------------------ routes
    def do_GET(self):
        self.guarded(self._get)

    def do_POST(self):
        self.guarded(self._post)

    def _not_allowed(self):
        self.close_connection = True
        self.send_error_json(ApiError(405, f"method {self.command} is not allowed on {self.path}"))

    do_PUT = do_DELETE = do_PATCH = do_HEAD = _not_allowed

    def _get(self):
        path = self.path.split("?")[0]
        if path in ("/", "/index.html"):
            self.send_response(200)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(self.server.page)))
            self.end_headers()
            self.wfile.write(self.server.page)
        elif path == "/health":
            engine = self.server.engine
            self.send_json(200, {"status": "ok", "running": len(engine.running), "waiting": engine.waiting.qsize(),
                                 "decode_steps": engine.steps, "tokens_generated": engine.tokens})
        elif path == "/v1/models":
            self.send_json(200, {"object": "list", "data": [self.server.model_card()]})
        elif path in ("/v1/chat/completions", "/v1/completions"):
            raise ApiError(405, f"{path} takes POST requests")
        else:
            raise ApiError(404, f"no such endpoint: GET {path}", code="not_found")

    def _post(self):
        path = self.path.split("?")[0]
        if path not in ("/v1/chat/completions", "/v1/completions"):
            self.close_connection = True  # the body is left unread
            raise ApiError(404, f"no such endpoint: POST {path}", code="not_found")
        body = self.read_json()
        server = self.server
        chat = path == "/v1/chat/completions"
        request = parse_request(body, chat, server.tokenizer, server.template, server.model.config.max_seq_len,
                                server.name, server.args.max_tokens)
        seq = Sequence(request.prompt_ids, request.max_tokens, request.sampling,
                       stop_ids=server.chat_stops if chat else server.completion_stops,
                       stop_strings=request.stop, tokenizer=server.tokenizer)
        job = Job(seq, server.tokenizer)
        server.engine.submit(job)
        try:
            (self.stream if request.stream else self.answer)(request, job)
        finally:
            job.cancel()  # a no-op once it ended; frees its batch row when the client left mid-way

    def answer(self, request: GenerationRequest, job: Job):
        pieces = []
        while True:
            kind, value = job.events.get()
            if kind == "text":
                pieces.append(value)
            elif kind == "error":
                raise ApiError(500, value, kind="server_error")
            else:
                break
        self.send_json(200, response(request, new_id(request.chat), self.server.name, "".join(pieces), value,
                                     len(job.seq.tokens)))

    def stream(self, request: GenerationRequest, job: Job):
        rid, name = new_id(request.chat), self.server.name
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream; charset=utf-8")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()

        def event(obj):
            self.write_chunk(b"data: " + json.dumps(obj, ensure_ascii=False).encode("utf-8") + b"\n\n")

        if request.chat:  # OpenAI's first chunk names the role
            event(chunk(request, rid, name, "", first=True))
        while True:
            kind, value = job.events.get()
            if kind == "text":
                event(chunk(request, rid, name, value))
                continue
            if kind == "error":
                event(ApiError(500, value, kind="server_error").body())
            else:
                event(chunk(request, rid, name, None, finish_reason=value))
                if request.include_usage:
                    event(chunk(request, rid, name, None, usage_counts={
                        "prompt_tokens": len(request.prompt_ids), "completion_tokens": len(job.seq.tokens),
                        "total_tokens": len(request.prompt_ids) + len(job.seq.tokens)}))
            break
        self.write_chunk(b"data: [DONE]\n\n")
        self.write_chunk(b"")  # the zero-length chunk that ends the response


def reject_constant(name: str):
    raise ValueError(f"{name} is not JSON")


def chat_layout(template: str, tokenizer) -> str | None:
    """The layout /v1/chat/completions renders with; None when the tokenizer has no chat layout (then only
    raw completions are served)."""
    try:
        return resolve_template(template, tokenizer)
    except ValueError:
        if template != "auto":
            raise
        return None


def build_server(args: ServeOptions) -> ModelServer:
    model = load_pretrained(args.model, device="cuda" if torch.cuda.is_available() else "cpu").eval()
    tokenizer = load_tokenizer(args.model)
    template = chat_layout(args.template, tokenizer)
    try:
        return ModelServer((args.host, args.port), model, tokenizer, template, args.name or args.model, args)
    except OSError as e:
        raise OSError(f"cannot listen on {args.host}:{args.port}: {e.strerror or e}") from None


@cli
def main(argv=None):
    args = parse_options(ServeOptions, argv, prog="python -m minillm.serve", description=__doc__.split("\n\n")[0])
    server = build_server(args)
    host, port = server.server_address[:2]
    shown = f"[{host}]" if ":" in host else host
    layout = server.template or "none: raw completions only"
    print(f"minillm.serve: {server.name} (chat layout {layout}, batch up to {args.max_batch_size})", flush=True)
    print(f"serving on http://{shown}:{port}/  (chat page at /, OpenAI API at /v1; Ctrl-C stops)", flush=True)
    try:
        server.serve_forever()
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
