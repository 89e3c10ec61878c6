"""`medlib serve`: the chatbot as a clinic would run it, one process serving

- a chat web page (Gradio's ChatInterface) at `/`, streaming, each reply labelled with its route;
- an OpenAI-compatible API: `GET /v1/models`, `POST /v1/chat/completions` (streamed or not);
- `GET /healthz`.

Both go through ChatSession.reply, so red flags come first and the urgent-care message is the
answer to an emergency on the page and over the API alike. One model serves every request: a
lock makes requests take turns (they queue; past `serve.max_queue` waiting, 503).

Secure defaults (recipe section `serve`, chat.yaml): binds 127.0.0.1; when MEDLIB_API_KEY is set,
every API request must carry `Authorization: Bearer <key>` and the page asks for it as its
password; request bodies over `max_request_bytes` get 413, clients over `rate_limit_per_minute`
get 429; a bad request gets a 4xx with an OpenAI-style JSON error, never a traceback. Nothing the
user types is written to disk unless `serve.transcript` (or --transcript) names a file.
"""
# No `from __future__ import annotations`: FastAPI reads the endpoints' annotations (Request) at run time.

import argparse
import hmac
import json
import logging
import os
import queue
import re
import threading
import time
import uuid
from collections import defaultdict, deque
from pathlib import Path
from typing import Any, Iterator

from starlette.requests import Request

from medlib.chat import guardrails
from medlib.chat.session import ChatSession
from medlib.config import ServeSettings

log = logging.getLogger(__name__)
API_KEY_ENV = "MEDLIB_API_KEY"
NOT_A_DEVICE = (
    "**Not a medical device.** This is a research demo of a fine-tuned language model. It can be wrong, "
    "it does not diagnose, and it is no substitute for a clinician. **In an emergency, call your local "
    "emergency number** (for example 911, 112 or 999).")
ROUTE_FOOTER = re.compile(r"\n\n\*route: [^\n]*\*$")


class RequestError(Exception):
    """A request the API refuses: HTTP status, OpenAI error type, message and the field at fault."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.headers = status, message, kind, param, headers or {}


class RateLimiter:
    """At most `per_minute` requests per client in any 60-second window (a sliding log)."""

    def __init__(self, per_minute: int, clock=time.monotonic):
        self.per_minute = per_minute
        self.clock = clock
        self._seen: dict[str, deque[float]] = defaultdict(deque)
        self._lock = threading.Lock()

    def check(self, client: str) -> float | None:
        """None when the request may go on, else the seconds until it may."""
        now = self.clock()
        with self._lock:
            seen = self._seen[client]
            while seen and now - seen[0] >= 60.0:
                seen.popleft()
            if len(seen) >= self.per_minute:
                return 60.0 - (now - seen[0])
            seen.append(now)
            return None


def message_text(content: Any, where: str) -> str:
    """An OpenAI message content (a string, or a list of text parts) as plain text."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for i, part in enumerate(content):
            if isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str):
                texts.append(part["text"])
            elif isinstance(part, str):
                texts.append(part)
            else:
                raise RequestError(400, f"{where}[{i}]: only text parts are supported", param=f"{where}[{i}]")
        return "\n".join(texts)
    raise RequestError(400, f"{where}: expected a string or a list of text parts, got {type(content).__name__}",
                       param=where)


def conversation(messages: Any) -> tuple[list[tuple[str, str]], str]:
    """OpenAI `messages` -> ((user, assistant) history, the new user message).

    System messages are accepted and not used: the model answers with the system prompt it was
    trained with. Turns must alternate user / assistant and end with a user message."""
    if not isinstance(messages, list) or not messages:
        raise RequestError(400, "messages: expected a non-empty list of {role, content} objects", param="messages")
    turns: list[tuple[str, str]] = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise RequestError(400, f"{where}: expected an object with 'role' and 'content'", param=where)
        role = message["role"]
        if role not in ("system", "developer", "user", "assistant"):
            raise RequestError(400, f"{where}.role: {role!r} is not one of system, developer, user, assistant",
                               param=f"{where}.role")
        if role in ("system", "developer"):
            continue
        text = message_text(message["content"], f"{where}.content")
        expected = "user" if not turns or turns[-1][0] == "assistant" else "assistant"
        if role != expected:
            raise RequestError(400, f"{where}.role: expected {expected!r} (turns alternate user / assistant)",
                               param=f"{where}.role")
        turns.append((role, ROUTE_FOOTER.sub("", text)))
    if not turns or turns[-1][0] != "user":
        raise RequestError(400, "messages: the last user/assistant message must be from the user", param="messages")
    history = [(turns[i][1], turns[i + 1][1]) for i in range(0, len(turns) - 1, 2)]
    return history, turns[-1][1]


def served_model_id(profile: str, run_name: str | None) -> str:
    """e.g. medlib-local-med-nirvana (the run folder's name), or medlib-local-base without an adapter."""
    return f"medlib-{profile}-{run_name or 'base'}"


class ChatServer:
    """One ChatSession shared by the page and the API; requests take turns on the model."""

    def __init__(self, session: Any, settings: ServeSettings, api_key: str | None = None):
        """settings: the chat recipe's `serve:` section (host, port and transcript as the command line set them);
        api_key: the key every request must carry (from the MEDLIB_API_KEY environment variable), or None."""
        self.session = session
        self.settings = settings
        self.api_key = api_key
        self.transcript = Path(settings.transcript) if settings.transcript else None
        self.limiter = RateLimiter(settings.rate_limit_per_minute)
        self._model_lock = threading.Lock()
        self._waiting = 0
        self._waiting_lock = threading.Lock()
        self._transcript_lock = threading.Lock()
        self.model_id = served_model_id(session.recipe.profile, session.run_name)

    # ------------------------------------------------------------------ one reply, streamed
    def reply_stream(self, history: list[tuple[str, str]], text: str, interface: str,
                     temperature: float | None = None, max_tokens: int | None = None) -> "ReplyStream":
        with self._waiting_lock:
            if self._waiting >= self.settings.max_queue:
                raise RequestError(503, f"the server is busy ({self._waiting} requests waiting); retry shortly",
                                   kind="server_busy", headers={"Retry-After": "5"})
            self._waiting += 1
        answered_before = any(guardrails.DISCLAIMER in answer for _, answer in history)
        session = self.session.fork(history, answers_given=int(answered_before),
                                    temperature=temperature, max_new_tokens=max_tokens)
        return ReplyStream(self, session, text, interface)

    def _release(self) -> None:
        with self._waiting_lock:
            self._waiting -= 1

    def record(self, interface: str, text: str, reply: Any) -> None:
        """Append the turn to the transcript, only when the operator asked for one."""
        if self.transcript is None:
            return
        self.transcript.parent.mkdir(parents=True, exist_ok=True)
        with self._transcript_lock, open(self.transcript, "a", encoding="utf-8") as f:
            f.write(json.dumps({"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "interface": interface,
                                "user": text, "kind": reply.kind, "tier": reply.tier, "red_flags": reply.red_flags,
                                "reply": reply.text}, ensure_ascii=False) + "\n")


class ReplyStream:
    """Runs ChatSession.reply in a thread (holding the model lock) and yields its text as it comes."""

    _END = object()

    def __init__(self, server: ChatServer, session: Any, text: str, interface: str):
        self.server, self.session, self.text, self.interface = server, session, text, interface
        self.reply: Any = None
        self.error: BaseException | None = None
        self._pieces: queue.Queue = queue.Queue()
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        try:
            with self.server._model_lock:
                self.reply = self.session.reply(self.text, stream=self._pieces.put)
            self.server.record(self.interface, self.text, self.reply)
        except BaseException as exc:  # handed to the reader, in its own thread
            self.error = exc
        finally:
            self.server._release()
            self._pieces.put(self._END)

    def __iter__(self) -> Iterator[str]:
        while (piece := self._pieces.get()) is not self._END:
            yield piece
        if self.error is not None:
            raise self.error

    def text_and_reply(self) -> tuple[str, Any]:
        return "".join(self), self.reply


def route_label(reply: Any) -> str:
    """The page's footer: the route, the tier and the category, e.g. "urgent · tier urgent · cardiac"."""
    label = f"{reply.kind} · tier {reply.tier}"
    categories = reply.red_flags or ([reply.category] if reply.category else [])
    return label + (" · " + ", ".join(categories) if categories else "")


def medlib_fields(reply: Any) -> dict[str, Any]:
    """What the API adds to OpenAI's response: the route and why (clients that do not know it ignore it)."""
    return {"route": reply.kind, "tier": reply.tier, "category": reply.category, "red_flags": list(reply.red_flags),
            "lang": reply.lang, "disclaimer": reply.disclaimer, "dose_caution": reply.dose_caution,
            "notices": list(reply.notices)}


# ---------------------------------------------------------------------- the API
# Each handler finds the ChatServer on request.app.state.server; create_app only wires them.
def _server(request: Any) -> ChatServer:
    return request.app.state.server


def _error_response(status: int, message: str, kind: str, param: str | None = None,
                    headers: dict[str, str] | None = None):
    from fastapi.responses import JSONResponse

    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": status}},
                        status_code=status, headers=headers)


async def on_request_error(request: Any, exc: RequestError):
    return _error_response(exc.status, exc.message, exc.kind, exc.param, exc.headers)


async def on_http_error(request: Any, exc: Any):
    return _error_response(exc.status_code, str(exc.detail), "invalid_request_error")


async def on_validation_error(request: Any, exc: Any):
    return _error_response(400, str(exc.errors()[:3]), "invalid_request_error")


async def on_internal_error(request: Any, exc: Exception):
    log.exception("error while answering %s", request.url.path)
    return _error_response(500, f"internal error ({type(exc).__name__}); see the server log", "server_error")


def authorize(request: Any) -> None:
    server = _server(request)
    if server.api_key is None:
        return
    header = request.headers.get("authorization", "")
    given = header[7:] if header.lower().startswith("bearer ") else ""
    if not hmac.compare_digest(given.encode(), server.api_key.encode()):
        raise RequestError(401, f"missing or wrong API key: send 'Authorization: Bearer <{API_KEY_ENV}>'",
                           kind="authentication_error")


def limit_rate(request: Any) -> None:
    server = _server(request)
    wait = server.limiter.check(request.client.host if request.client else "unknown")
    if wait is not None:
        raise RequestError(429, f"rate limit of {server.settings.rate_limit_per_minute} requests per minute reached",
                           kind="rate_limit_exceeded", headers={"Retry-After": str(max(1, round(wait)))})


async def read_payload(request: Any, limit: int) -> dict[str, Any]:
    """The request's JSON object, refused (413) past `limit` bytes, declared or streamed."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise RequestError(413, f"request body of {int(declared):,} bytes is over the {limit:,}-byte limit",
                           kind="request_too_large")
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise RequestError(413, f"request body is over the {limit:,}-byte limit", kind="request_too_large")
    try:
        payload = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RequestError(400, f"the body is not valid JSON: {exc}") from None
    if not isinstance(payload, dict):
        raise RequestError(400, "the body must be a JSON object")
    return payload


def healthz(request: Request):
    return {"status": "ok", "model": _server(request).model_id}


def list_models(request: Request):
    authorize(request)
    server = _server(request)
    return {"object": "list", "data": [{"id": server.model_id, "object": "model", "created": 0, "owned_by": "medlib",
                                        "description": server.session.public_description()}]}


async def chat_completions(request: Request):
    from fastapi.responses import StreamingResponse
    from starlette.concurrency import run_in_threadpool

    authorize(request)
    limit_rate(request)
    server = _server(request)
    payload = await read_payload(request, server.settings.max_request_bytes)
    requested = payload.get("model")
    if requested not in (None, server.model_id):
        raise RequestError(404, f"model {requested!r} is not served here; GET /v1/models lists {server.model_id!r}",
                           kind="model_not_found", param="model")
    history, text = conversation(payload.get("messages"))
    temperature = payload.get("temperature")
    if temperature is not None and (not isinstance(temperature, (int, float)) or not 0 <= temperature <= 2):
        raise RequestError(400, "temperature: expected a number from 0 to 2", param="temperature")
    max_tokens = payload.get("max_completion_tokens", payload.get("max_tokens"))
    if max_tokens is not None and (not isinstance(max_tokens, int) or max_tokens < 1):
        raise RequestError(400, "max_tokens: expected a positive integer", param="max_tokens")
    stream = server.reply_stream(history, text, "api", temperature, max_tokens)
    base = {"id": f"chatcmpl-{uuid.uuid4().hex[:24]}", "created": int(time.time()), "model": server.model_id}

    if not payload.get("stream"):
        text_out, reply = await run_in_threadpool(stream.text_and_reply)
        count = server.session.tokenizer
        usage = {"prompt_tokens": len(count(text, add_special_tokens=False)["input_ids"]),
                 "completion_tokens": len(count(text_out, add_special_tokens=False)["input_ids"])}
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        return {**base, "object": "chat.completion", "usage": usage, "medlib": medlib_fields(reply),
                "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": text_out}}]}
    return StreamingResponse(completion_events(stream, base), media_type="text/event-stream")


def completion_events(stream: "ReplyStream", base: dict[str, Any]) -> Iterator[str]:
    """The server-sent events of a streamed completion; the last chunk carries the medlib fields."""
    def chunk(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> str:
        return "data: " + json.dumps({**base, "object": "chat.completion.chunk", **extra, "choices": [
            {"index": 0, "delta": delta, "finish_reason": finish}]}) + "\n\n"

    yield chunk({"role": "assistant", "content": ""})
    try:
        for piece in stream:
            yield chunk({"content": piece})
    except Exception as exc:  # the stream has started: report in-band, no traceback
        log.exception("error while streaming a reply")
        yield "data: " + json.dumps({"error": {"message": f"internal error ({type(exc).__name__})",
                                               "type": "server_error"}}) + "\n\n"
        return
    yield chunk({}, "stop", medlib=medlib_fields(stream.reply))
    yield "data: [DONE]\n\n"


def create_app(server: ChatServer, with_page: bool = True):
    """The FastAPI app: the handlers above on their paths, the error handlers, and the page at /."""
    from fastapi import FastAPI
    from fastapi.exceptions import RequestValidationError
    from starlette.exceptions import HTTPException as StarletteHTTPException

    app = FastAPI(title="medlib", docs_url=None, redoc_url=None)
    app.state.server = server
    for exc_type, handler in ((RequestError, on_request_error), (StarletteHTTPException, on_http_error),
                              (RequestValidationError, on_validation_error), (Exception, on_internal_error)):
        app.add_exception_handler(exc_type, handler)
    app.add_api_route("/healthz", healthz, methods=["GET"])
    app.add_api_route("/v1/models", list_models, methods=["GET"])
    app.add_api_route("/v1/chat/completions", chat_completions, methods=["POST"])
    if with_page:
        import gradio as gr

        auth = None
        if server.api_key is not None:
            def auth(username: str, password: str) -> bool:
                return hmac.compare_digest(password.encode(), server.api_key.encode())
        app = gr.mount_gradio_app(app, build_page(server), path="/", auth=auth, ssr_mode=False,
                                  footer_links=[], auth_message="Password: this server's MEDLIB_API_KEY "
                                                                "(any user name).")
    return app


# ---------------------------------------------------------------------- the page
def page_history(history: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """Gradio's messages -> (user, assistant) pairs, without the route footers the page added."""
    messages = [{"role": m["role"], "content": gradio_text(m.get("content"))} for m in history
                if m.get("role") in ("user", "assistant")]
    pairs, pending = [], None
    for m in messages:
        if m["role"] == "user":
            pending = m["content"] if pending is None else pending + "\n" + m["content"]
        elif pending is not None:
            pairs.append((pending, ROUTE_FOOTER.sub("", m["content"])))
            pending = None
    return pairs


def gradio_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, dict):
        return str(content.get("text") or content.get("value") or "")
    if isinstance(content, (list, tuple)):
        return "\n".join(gradio_text(part) for part in content)
    return "" if content is None else str(content)


def build_page(server: ChatServer):
    import gradio as gr

    def respond(message: str, history: list[dict[str, Any]]) -> Iterator[str]:
        stream = server.reply_stream(page_history(history), message, "page")
        shown = ""
        for piece in stream:
            shown += piece
            yield shown
        yield shown + f"\n\n*route: {route_label(stream.reply)}*"

    logged = (f"This server keeps a transcript of every conversation (at the operator's request: "
              f"{server.transcript.name})." if server.transcript else
              "Nothing you type is written to disk by this server.")
    description = (f"{NOT_A_DEVICE}\n\nModel: {server.session.public_description()}. {logged} "
                   "Each reply ends with the route it took and its red-flag tier: medical (the model answered), "
                   "safety_net (the model answered, with a line on when to call for help), urgent (an emergency: "
                   "urgent-care advice, the model is not asked), support, english_only, greeting or fallback "
                   "(not a health question).")
    chatbot = gr.Chatbot(label="medlib chat", buttons=["copy", "copy_all"])  # no share button: nothing leaves the page
    return gr.ChatInterface(respond, chatbot=chatbot, title="medlib chat", description=description, flagging_mode="never",
                            analytics_enabled=False, save_history=False, cache_examples=False,
                            examples=["Hello!", "What are the common side effects of metformin?",
                                      "I have had a dry cough for three weeks. What could cause it?"],
                            run_examples_on_click=True)


# ---------------------------------------------------------------------- CLI
def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "serve", help="the chatbot as a web page and an OpenAI-compatible API (localhost by default)",
        description="Serve the routed chatbot: a chat page at / and POST /v1/chat/completions, GET /v1/models. "
                    f"Set {API_KEY_ENV} to require 'Authorization: Bearer <key>' (and a password on the page).")
    parser.add_argument("--profile", choices=["local", "paper"], default="local",
                        help="recipe profile (default: %(default)s)")
    parser.add_argument("--adapter", default=None,
                        help="adapter folder (default: the recipe's, i.e. outputs/<profile>/med-nirvana; "
                             "the base model runs, with a notice, while it does not exist)")
    parser.add_argument("--host", default=None, help="address to bind (default: the recipe's, 127.0.0.1)")
    parser.add_argument("--port", type=int, default=None, help="port (default: the recipe's, 8000; 0 = any free port)")
    parser.add_argument("--transcript", default=None,
                        help="append every turn to this JSONL file (default: nothing typed is written to disk)")
    parser.add_argument("--no-page", action="store_true", help="serve the API only")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a chat recipe key, e.g. --set serve.rate_limit_per_minute=120 (repeatable)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    import socket

    import uvicorn
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    session = ChatSession.from_profile(args.profile, adapter=args.adapter, overrides=args.overrides)
    given = {"host": args.host, "port": args.port, "transcript": args.transcript}
    settings = session.recipe.serve.replace(**{k: v for k, v in given.items() if v is not None})
    server = ChatServer(session, settings, api_key=os.environ.get(API_KEY_ENV) or None)
    app = create_app(server, with_page=not args.no_page)
    sock = socket.socket(socket.AF_INET6 if ":" in settings.host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((settings.host, settings.port))  # bound here so --port 0 can report the port it got
    host, port = sock.getsockname()[:2]
    print(f"[medlib serve] {session.describe()}", flush=True)
    for notice in session.startup_notices:
        print(f"[medlib serve] {notice}", flush=True)
    print(f"[medlib serve] API key {'required' if server.api_key else f'not required (set {API_KEY_ENV} to require one)'}; "
          f"transcript {server.transcript or 'off: nothing typed is written to disk'}", flush=True)
    print(f"[medlib serve] listening on http://{host}:{port}/ (page{'' if not args.no_page else ' off'}) "
          f"and http://{host}:{port}/v1", flush=True)
    uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False)).run(sockets=[sock])
    return 0
