"""`bkd-edge serve`: one loaded student behind HTTP (FastAPI on uvicorn).

    POST /v1/bundles         one session {"items": [{"id", "title", "categories"?}, ...], "session_id"?}
                             -> its prediction record
    POST /v1/bundles:batch   {"sessions": [...]} -> {"predictions": [...]}, in input order
    GET  /v1/models          the student: base and adapter sha256, pack, quant, answer format
    GET  /healthz            200 once the model is loaded and a warm-up session has run
    GET  /metrics            Prometheus text: requests by route and status, latency, tokens, queue, in flight
    GET  /docs               the OpenAPI schema, browsable

Every request shares one model through the multi-sequence scheduler (`runtime.concurrent.Batched`):
up to `parallel` sessions decode together, the pack's static prefix is evaluated once, and at most
`queue` more wait (then 429 with Retry-After). A session past `timeout_s` gets 504 and its sequence
is freed; so is the sequence of a client that disconnects. Bad input is a 4xx JSON error naming the
field; titles reach the model as text (special tokens off), as in `generate`.

Security: an address other than loopback needs an API key (`api_key_env`: the NAME of the variable
holding it); with one, every route but /healthz needs `Authorization: Bearer KEY` (compared in
constant time). The key is never logged, nor are titles: the access log (JSON lines on stderr)
holds method, path, status, latency and item count.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import math
import os
import sys
import time
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.concurrency import run_in_threadpool

from .. import BkdError
from ..data import Session, sample_sessions_path, session_from_dict

LOOPBACK = ("127.0.0.1", "::1", "localhost")
ROUTES = ("/v1/bundles", "/v1/bundles:batch", "/v1/models", "/healthz", "/metrics", "/docs", "/openapi.json")


@dataclass(frozen=True)
class ServeConfig:
    model: str = "default"
    adapters: tuple[str, ...] = ()
    pack: str | None = None
    n_ctx: int = 0
    threads: int = 0
    seed: int = 0
    host: str = "127.0.0.1"
    port: int = 8090
    parallel: int = 4  # sessions decoded together
    queue: int = 64  # sessions waiting beyond those; more is 429
    timeout_s: float = 60.0  # per request, queueing included; past it 504
    api_key_env: str = ""  # the NAME of the variable holding the API key
    max_items: int = 200  # per session
    max_bytes: int = 1 << 20  # per request body
    max_sessions: int = 64  # per batch request
    gpu_layers: int | None = None  # offloaded to a GPU (-1: all); None: the student card's


def api_key(config: ServeConfig) -> str | None:
    """The key requests must carry (None: no auth). Refuses a non-loopback address without one."""
    if config.api_key_env:
        key = os.environ.get(config.api_key_env, "")
        if not key:
            raise BkdError(f"--api-key-env {config.api_key_env}: that environment variable is not set or empty")
        return key
    if config.host not in LOOPBACK:
        raise BkdError(
            f"--host {config.host}: serving beyond this machine needs an API key (--api-key-env NAME); "
            "without one bind 127.0.0.1"
        )
    return None


class ApiError(Exception):
    """A 4xx/5xx answer: a JSON body {"error": message, "field": the request field at fault}."""

    def __init__(self, status: int, message: str, field: str = "", headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.field, self.headers = status, message, field, headers or {}

    def response(self) -> JSONResponse:
        body = {"error": self.message, **({"field": self.field} if self.field else {})}
        return JSONResponse(body, self.status, headers=self.headers)


# ---------------------------------------------------------------- request bodies


async def read_json(request: Request, max_bytes: int):
    """The request body as JSON, refusing more than `max_bytes` before reading it all."""
    body, seen = bytearray(), 0
    async for chunk in request.stream():
        seen += len(chunk)
        if seen > 8 * max_bytes:  # read on a little so the client sees the 413, not a reset connection
            break
        if seen <= max_bytes:
            body += chunk
    if seen > max_bytes:
        raise ApiError(413, f"the body is over {max_bytes} bytes", "body")
    try:
        return json.loads(body.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ApiError(400, f"the body is not UTF-8 (byte {e.start + 1})", "body") from None
    except json.JSONDecodeError as e:
        raise ApiError(
            400, f"the body is not valid JSON ({e.msg} at line {e.lineno} column {e.colno})", "body"
        ) from None
    except (ValueError, RecursionError):  # a number past Python's 4,300 digits, nesting past its stack
        raise ApiError(400, "the body is JSON too deeply nested or with a number too long to read", "body") from None


def parse_session(obj, where: str, default_id: str, max_items: int) -> Session:
    """One session of a request, checked: an object with 2..max_items items, each with an id
    (unique) and a string title. Errors name the field, e.g. `sessions[2].items[5].id`."""
    at = f"{where}." if where else ""
    if not isinstance(obj, dict):
        raise ApiError(422, "expected a JSON object with an 'items' list", where or "body")
    items = obj.get("items")
    if not isinstance(items, list):
        raise ApiError(422, "missing or not a list: 'items' (objects with 'id' and 'title')", f"{at}items")
    if len(items) < 2:
        raise ApiError(422, f"{len(items)} item(s): a bundle needs at least 2", f"{at}items")
    if len(items) > max_items:
        raise ApiError(413, f"{len(items)} items: at most {max_items} a session", f"{at}items")
    sid = obj.get("session_id", default_id)
    if not isinstance(sid, (str, int)) or isinstance(sid, bool):
        raise ApiError(422, "must be a string or an integer", f"{at}session_id")
    seen = set()
    for i, it in enumerate(items):
        field = f"{at}items[{i}]"
        if not isinstance(it, dict):
            raise ApiError(422, "expected an object with 'id' and 'title'", field)
        iid = it.get("id")
        if iid is None or isinstance(iid, bool) or not isinstance(iid, (str, int)) or str(iid) == "":
            raise ApiError(422, "missing, empty or not a string/integer: every item needs an id", f"{field}.id")
        if str(iid) in seen:
            raise ApiError(422, f"item id {str(iid)!r} appears twice in the session", f"{field}.id")
        seen.add(str(iid))
        if not isinstance(it.get("title", ""), str):
            raise ApiError(422, "must be a string", f"{field}.title")
    try:
        return session_from_dict({**obj, "session_id": sid}, where or "body", require_bundles=False)
    except BkdError as e:  # anything else the loader refuses, in its own words (which name the field)
        raise ApiError(422, str(e), where or "body") from None


SESSION_SCHEMA = {
    "type": "object",
    "required": ["items"],
    "properties": {
        "session_id": {"type": ["string", "integer"], "description": "echoed in the record"},
        "items": {
            "type": "array",
            "minItems": 2,
            "maxItems": 200,
            "items": {
                "type": "object",
                "required": ["id"],
                "properties": {
                    "id": {"type": ["string", "integer"]},
                    "title": {"type": "string"},
                    "categories": {
                        "type": "array",
                        "description": 'category paths, root first, e.g. [["Electronics", "Camera & Photo"]]',
                        "items": {"type": "array", "items": {"type": "string"}},
                    },
                },
            },
        },
    },
    "example": {"items": [{"id": "A", "title": "Canon EOS camera"}, {"id": "B", "title": "Camera bag"}]},
}
BATCH_SCHEMA = {"type": "object", "required": ["sessions"],
                "properties": {"sessions": {"type": "array", "items": SESSION_SCHEMA}}}  # fmt: skip
RECORD_DOC = "The prediction record `bkd-edge generate` writes: bundles (items, intent), valid, raw, timing."


def _body(schema: dict) -> dict:
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


ERRORS = {
    code: {"description": why, "content": {"application/json": {"example": {"error": "...", "field": "items[1].id"}}}}
    for code, why in [
        (400, "malformed JSON"),
        (401, "missing or wrong API key"),
        (413, "too many items or bytes"),
        (422, "a field is missing or wrong"),
        (429, "the queue is full: retry after Retry-After seconds"),
        (503, "shutting down"),
        (504, "past the timeout"),
    ]
}


# ---------------------------------------------------------------- the service


class Service:
    """The loaded student, its scheduler and its metrics."""

    def __init__(self, config: ServeConfig):
        from ..runtime.concurrent import Batched
        from ..student import Student

        self.config = config
        self.student = Student.load(config.model, config.adapters, config.pack, config.n_ctx, config.threads,
                                    config.seed, gpu_layers=config.gpu_layers)  # fmt: skip
        engine = self.student.engine
        prefix = engine.prefix_tokens(self.student.pack.static if self.student.pack else "")
        self.batched = Batched(engine, config.parallel, prefix, max_queue=config.queue)
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("bkd_requests", "HTTP requests answered, by route and status", ["route", "status"],
                                registry=r)  # fmt: skip
        self.latency = Histogram("bkd_request_seconds", "HTTP request latency (s), by route", ["route"], registry=r,
                                 buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64, 128))  # fmt: skip
        self.sessions = Counter("bkd_sessions", "sessions answered", registry=r)
        self.prompt_tokens = Counter("bkd_prompt_tokens", "prompt tokens of the sessions answered", registry=r)
        self.answer_tokens = Counter("bkd_answer_tokens", "answer tokens of the sessions answered", registry=r)
        Gauge("bkd_queue_depth", "sessions waiting for a sequence", registry=r).set_function(
            lambda: self.batched.queued
        )
        Gauge("bkd_sessions_in_flight", "sessions decoding now", registry=r).set_function(
            lambda: self.batched.in_flight
        )
        self.ready = False
        warm = [s for s in _sample() if len(s.items) >= 2][:1]
        for s in warm:  # pages the weights in, builds the grammar caches: /healthz says ready after it
            self.batched.submit(s, **self.student.inputs(s)[0]).result()
        self.ready = True
        self.model_info = _model_info(self.student, engine)

    def inputs(self, session: Session) -> tuple[dict, float]:
        return self.student.inputs(session)

    def check(self, session: Session, inputs: dict) -> None:
        try:
            self.student.engine.check_prompt(session, inputs["knowledge"], inputs["examples"])
        except BkdError as e:
            raise ApiError(413, str(e), "items") from None

    def submit(self, sessions: list[Session], inputs: list[dict]) -> list[Future]:
        """Every session queued, or none (429 when the queue cannot take them all)."""
        from ..runtime.concurrent import Closed, QueueFull

        futures = []
        try:
            for s, p in zip(sessions, inputs):
                futures.append(self.batched.submit(s, **p))
        except QueueFull:
            for f in futures:
                self.batched.cancel(f)
            retry = max(1, math.ceil(self.batched.queued / self.config.parallel))  # ~1 s a session a sequence
            full = f"the queue is full ({self.config.queue} waiting)"
            raise ApiError(429, full, headers={"Retry-After": str(retry)}) from None
        except Closed:
            for f in futures:
                self.batched.cancel(f)
            raise ApiError(503, "the server is shutting down") from None
        return futures

    async def wait(self, request: Request, futures: list[Future], prepare_s: list[float]) -> list[dict]:
        """The records, in order, each with the seconds its inputs took (`prepare_s`) in its timing.
        Past the timeout: 504; a client gone: its sessions cancelled (499). Either way their
        sequences are freed."""
        loop = asyncio.get_running_loop()
        waiting = [asyncio.wrap_future(f) for f in futures]
        for w in waiting:
            w.add_done_callback(lambda w: w.cancelled() or w.exception())  # retrieved: no "never retrieved" noise
        deadline = loop.time() + self.config.timeout_s
        pending = set(waiting)
        while pending:
            _, pending = await asyncio.wait(pending, timeout=min(0.1, max(deadline - loop.time(), 0)))
            if not pending:
                break
            gone = await request.is_disconnected()
            if gone or loop.time() >= deadline:
                for f in futures:
                    self.batched.cancel(f)
                if gone:
                    raise ApiError(499, "the client closed the connection")
                raise ApiError(504, f"no answer within {self.config.timeout_s:g} s (the session was cancelled)")
        try:
            gens = [f.result().with_prepare(seconds) for f, seconds in zip(futures, prepare_s)]
        except BkdError as e:  # what this session could not do (e.g. a candidate answer too long for the context)
            raise ApiError(422, str(e), "items") from None
        for g in gens:
            self.sessions.inc()
            self.prompt_tokens.inc(g.timing.prompt_tokens)
            self.answer_tokens.inc(g.timing.completion_tokens)
        return [g.to_record() for g in gens]

    def close(self) -> None:
        self.batched.close(drain=True)


def _sample() -> list[Session]:
    from ..data import load_sessions

    return load_sessions(sample_sessions_path(), require_bundles=False)


def _model_info(student, engine) -> dict:
    """The student as its card names it (base, adapters) and what this server runs of it (a merged
    form has the adapter in its weights: `runs`)."""
    from gguf import LlamaFileType

    file_type = engine.llm.metadata.get("general.file_type")
    try:
        quant = LlamaFileType(int(file_type)).name.removeprefix("MOSTLY_")
    except (TypeError, ValueError):
        quant = file_type
    base = student.card.get("base") or {}
    adapters = [{"file": Path(a["file"]).name, "sha256": a["sha256"], "scale": a["scale"]} for a in engine.adapters]
    adapters = adapters or [
        {k: a.get(k) for k in ("file", "sha256", "scale")} for a in student.card.get("adapters") or []
    ]
    runs = {"file": Path(engine.model_path).name, "sha256": engine.model_sha256(), "quant": quant}
    return {
        "id": student.name,
        "object": "model",
        "student": student.name,
        "base": {"file": base.get("file") or runs["file"], "sha256": base.get("sha256") or runs["sha256"]},
        "adapters": adapters,
        "runs": {**runs, "form": student.form},
        "quant": quant,
        "pack": student.pack.folder.name if student.pack else None,
        "answer_format": student.prompt.answer_format,
        "n_ctx": engine.config.n_ctx,
        **engine.offload(),
    }


# ---------------------------------------------------------------- the app


def create_app(service: Service, key: str | None) -> FastAPI:
    app = FastAPI(title="bkd-edge serve", version=_version(), description=__doc__.split("\n\n")[0])
    config = service.config

    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError):
        return e.response()

    @app.exception_handler(Exception)
    async def unexpected(request: Request, e: Exception):  # a bug: say so without a traceback to the client
        logging.getLogger("bkd_edge.serve").exception("unexpected error")
        return JSONResponse({"error": f"internal error ({type(e).__name__})"}, 500)

    @app.post("/v1/bundles", summary="Bundles for one session", description=RECORD_DOC,
              openapi_extra=_body(SESSION_SCHEMA), responses=ERRORS)  # fmt: skip
    async def bundles(request: Request):
        obj = await read_json(request, config.max_bytes)
        session = parse_session(obj, "", "request", config.max_items)
        request.state.items = len(session.items)
        (record,) = await _answer(request, [session])
        return record

    @app.post("/v1/bundles:batch", summary="Bundles for several sessions, in input order",
              openapi_extra=_body(BATCH_SCHEMA), responses=ERRORS)  # fmt: skip
    async def bundles_batch(request: Request):
        obj = await read_json(request, config.max_bytes)
        raw = obj.get("sessions") if isinstance(obj, dict) else None
        if not isinstance(raw, list) or not raw:
            raise ApiError(422, "missing, empty or not a list: 'sessions'", "sessions")
        if len(raw) > config.max_sessions:
            raise ApiError(413, f"{len(raw)} sessions: at most {config.max_sessions} a request", "sessions")
        sessions = [parse_session(s, f"sessions[{i}]", str(i), config.max_items) for i, s in enumerate(raw)]
        ids = [s.session_id for s in sessions]
        if len(set(ids)) != len(ids):
            dup = next(i for i, x in enumerate(ids) if ids.index(x) != i)
            raise ApiError(422, f"session id {ids[dup]!r} appears twice", f"sessions[{dup}].session_id")
        request.state.items = sum(len(s.items) for s in sessions)
        return {"predictions": await _answer(request, sessions)}

    async def _answer(request: Request, sessions: list[Session]) -> list[dict]:
        def prepare():  # the hint, retrieval and tokenizing: off the event loop
            inputs, seconds = zip(*[service.inputs(s) for s in sessions])
            for s, p in zip(sessions, inputs):
                service.check(s, p)
            return inputs, seconds

        inputs, seconds = await run_in_threadpool(prepare)
        return await service.wait(request, service.submit(sessions, inputs), seconds)

    @app.get("/v1/models", summary="The student this server runs")
    async def models():
        return {"object": "list", "data": [service.model_info]}

    @app.get("/healthz", summary="200 once the model is loaded and warmed up")
    async def healthz():
        if not service.ready:
            return JSONResponse({"status": "loading"}, 503)
        return {"status": "ok", "in_flight": service.batched.in_flight, "queued": service.batched.queued}

    @app.get("/metrics", summary="Prometheus metrics")
    async def metrics():
        return Response(generate_latest(service.registry), media_type=CONTENT_TYPE_LATEST)

    return Guard(app, service, key)


class Guard:
    """Around the app: the API key on every route but /healthz, then the access log and the
    request metrics (status and latency by route)."""

    def __init__(self, app: FastAPI, service: Service, key: str | None):
        self.app, self.service, self.key = app, service, key
        self.log = logging.getLogger("bkd_edge.access")

    def authorized(self, scope) -> bool:
        given = dict(scope["headers"]).get(b"authorization", b"")
        expected = b"Bearer " + self.key.encode("utf-8")
        return hmac.compare_digest(given, expected)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0, status = time.perf_counter(), [500]

        async def send_status(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            if self.key and scope["path"] != "/healthz" and not self.authorized(scope):
                body = {"error": "missing or wrong API key (Authorization: Bearer KEY)", "field": "Authorization"}
                await JSONResponse(body, 401, headers={"WWW-Authenticate": "Bearer"})(scope, receive, send_status)
            else:
                await self.app(scope, receive, send_status)
        finally:
            seconds = time.perf_counter() - t0
            route = scope["path"] if scope["path"] in ROUTES else "other"
            self.service.requests.labels(route, str(status[0])).inc()
            self.service.latency.labels(route).observe(seconds)
            items = (scope.get("state") or {}).get("items")
            line = {"ts": round(time.time(), 3), "method": scope["method"], "path": route, "status": status[0],
                    "latency_ms": round(seconds * 1000, 1), "items": items}  # fmt: skip
            self.log.info(json.dumps(line))


def _version() -> str:
    from .. import __version__

    return __version__


def access_log() -> None:
    """JSON lines on stderr, one a request."""
    log = logging.getLogger("bkd_edge.access")
    if not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False


def serve(config: ServeConfig, on_loaded=None) -> None:
    """Load the student, warm it up, serve until SIGTERM or Ctrl-C; then stop accepting, answer every
    request already accepted and return (the process exits 0)."""
    import signal

    import uvicorn

    key = api_key(config)  # refuse a bad bind before the model loads
    service = Service(config)
    access_log()
    server = uvicorn.Server(uvicorn.Config(
        create_app(service, key), host=config.host, port=config.port, access_log=False, log_level="warning",
        timeout_graceful_shutdown=None, lifespan="off",
    ))  # fmt: skip
    # uvicorn drains on SIGTERM/SIGINT, then raises the signal again under the handlers it found: make
    # those a no-op, so a drained server exits 0 and not "killed by SIGTERM".
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    if on_loaded:  # the CLI says what it serves
        on_loaded(service)
    try:
        server.run()
    finally:
        service.close()
