"""A writing page in the browser: continue your story with a trained model, streamed, with several candidates.

    python serve.py                                   # the model in out/ (or the newest out*/), at http://127.0.0.1:8000
    python serve.py --out_dir out-novel-cpu --port 8080
    python serve.py --init_from model/final_model --vocab cache/vocab_small.txt

The model is chosen here, at start-up; no request can name a file. Requests are served one at a time, first
come first served (a waiting page shows how many are ahead of it); a closed tab or Stop ends its generation.
Each candidate is checked against the training text of the checkpoint's dataset, and copied spans are marked.
"""

import os

# Before torch loads its OpenMP runtime: decoding is many tiny products per token, and threads that
# spin-wait for a descheduled sibling made it 5x slower (27x at worst) beside any busy process on 2 cores;
# passive waiting does not. A value the user set wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import asyncio
import contextlib
import errno
import ipaddress
import json
import math
import random
import secrets
import socket
import sys
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import AsyncIterator, Iterator, get_type_hints
from urllib.parse import urlsplit

import torch
import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field, create_model
from starlette.exceptions import HTTPException

from configurator import Options, UserError, exit_with_error, get_config
from novelgpt.copycheck import DEFAULT_MIN_COPY, GRAM, CopyIndex, find_copies
from novelgpt.engine import Engine, SamplingSettings
from novelgpt.startup import load_writer, start_options
from novelgpt.tokenizer import Tokenizer

STATIC = Path(__file__).resolve().parent / "static"
FRAME_SECONDS = 0.015  # tokens generated within one frame go out as one event: fewer, fuller messages
KEEPALIVE_SECONDS = 5.0  # a waiting request sends a comment this often, so a vanished client is noticed
MAX_CANDIDATES = 4
SAFE_METHODS = ("GET", "HEAD", "OPTIONS")  # every other method changes state, and gets the cross-site checks
MAX_ERRORS_SHOWN = 3  # an error reply names at most this many problems, so that it stays short
STOPPING = "the server is stopping; start it again to go on"
# pydantic's words where they say little to a writer: JSON can carry a lone surrogate (\ud800), which no text has
MESSAGES = {"string_unicode": "not valid Unicode text (it holds a lone surrogate such as \\ud800)"}

TYPES = dict(compile=bool)  # keys whose default None means auto
DEFAULTS = Options(
    **start_options("served"),
    host=("127.0.0.1", "anything but a loopback address exposes the model to the network: at your own risk"),
    port=(8000, "0: any free port"),
    # the page's starting values; each request may change them within the limits below
    **SamplingSettings.options(max_new_tokens=200),
    # limits, enforced on the server
    max_prompt_chars=(20000, "the longest story a request may send (the model reads its last block_size tokens)"),
    max_tokens_limit=(2000, "the most characters a request may ask for per candidate"),
    max_waiting=(32, "requests that may wait in the queue; more get 503"),
    min_copy=(DEFAULT_MIN_COPY, "copy check: mark spans of at least this many characters found in the training text"),
    copy_check=(True, "False: no copy check (no index is built)"),
)
ALIASES = dict(length="max_new_tokens", nsamples="num_samples", topk="top_k", topp="top_p",
               model_path="init_from", tokenizer_path="vocab")


@dataclass(frozen=True)
class Limits:
    """What one request may ask for; larger values get a 422 answer."""
    max_prompt_chars: int = 20000
    max_new_tokens: int = 2000
    max_waiting: int = 32


@dataclass(eq=False)
class Job:
    """One request: its prompt and settings, and the events the worker sends back to its page."""
    prompt: str
    settings: SamplingSettings
    id: str = field(default_factory=lambda: secrets.token_urlsafe(12))
    events: asyncio.Queue = field(default_factory=asyncio.Queue)  # (name, data) tuples; None ends the stream
    stopped: bool = False


def pull_pieces(stream: Iterator[tuple[int, str]], seconds: float) -> list[tuple[int, str]]:
    """The next pieces of a generation: at least one (none when it has ended), then more until seconds pass."""
    pieces, start = [], time.perf_counter()
    for piece in stream:  # leaving the loop by break does not close the generator
        pieces.append(piece)
        if time.perf_counter() - start >= seconds:
            break
    return pieces


class Scheduler:
    """One worker generates for one job at a time, first come first served; waiting jobs learn how many are
    ahead. Generation runs on one thread of its own, so the event loop stays free to stream and to listen."""

    def __init__(self, engine: Engine, tok: Tokenizer, copy_index: CopyIndex | None, min_copy: int):
        self.engine, self.tok, self.copy_index, self.min_copy = engine, tok, copy_index, min_copy
        self.waiting: deque[Job] = deque()
        self.running: Job | None = None
        self.jobs: dict[str, Job] = {}  # waiting or running, by id: what /api/stop can reach
        self.wake = asyncio.Event()
        self.closing = False  # set when the server begins to stop: no new jobs, and every stream ends
        # one thread: torch runs there, and a generator is only ever resumed by the thread that made it
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="generate")

    def submit(self, job: Job) -> None:
        self.waiting.append(job)
        self.jobs[job.id] = job
        self._announce()
        self.wake.set()

    def ahead_of(self, job: Job) -> int:
        """Jobs that will finish before this one starts, the running one included."""
        return self.waiting.index(job) + (self.running is not None) if job in self.waiting else 0

    def _announce(self) -> None:
        for job in self.waiting:
            job.events.put_nowait(("queue", {"ahead": self.ahead_of(job)}))

    def cancel(self, job: Job) -> None:
        """Stop a job: a waiting one leaves the queue at once, a running one after its current frame."""
        job.stopped = True
        if job in self.waiting:
            self.waiting.remove(job)
            self.jobs.pop(job.id, None)
            job.events.put_nowait(None)
            self._announce()

    def stop_all(self) -> None:
        """The server is stopping: every stream ends at once (a waiting one is told why), so that uvicorn's
        grace period never runs out and cancels a response mid-stream, a traceback in the terminal."""
        self.closing = True
        for job in list(self.waiting) + ([self.running] if self.running else []):
            job.events.put_nowait(("error", {"message": STOPPING}))
            self.cancel(job)

    async def run(self) -> None:
        """The worker: forever take the oldest waiting job and generate for it."""
        while True:
            while not self.waiting:
                self.wake.clear()
                await self.wake.wait()
            job = self.running = self.waiting.popleft()
            self._announce()
            try:
                await self._generate(job)
            except ValueError as e:  # what the engine refuses, said to the page in one line
                job.events.put_nowait(("error", {"message": str(e)}))
            finally:
                self.running = None
                self.jobs.pop(job.id, None)
                job.events.put_nowait(None)

    async def _generate(self, job: Job) -> None:
        loop = asyncio.get_running_loop()
        job.events.put_nowait(("start", {}))
        texts: list[list[str]] = [[] for _ in range(job.settings.num_samples)]
        count, start = 0, time.perf_counter()
        stream = self.engine.stream_text(self.tok, job.prompt, job.settings)
        try:
            while not job.stopped:
                pieces = await loop.run_in_executor(self.executor, pull_pieces, stream, FRAME_SECONDS)
                if not pieces:
                    break
                for row, piece in pieces:
                    texts[row].append(piece)
                count += len(pieces)
                job.events.put_nowait(("tokens", {"pieces": pieces}))
        finally:
            # on the generation thread: closing a generator another thread is running would fail
            await asyncio.shield(loop.run_in_executor(self.executor, stream.close))
        seconds = time.perf_counter() - start
        copies = await loop.run_in_executor(self.executor, self.check_copies, ["".join(t) for t in texts])
        job.events.put_nowait(("done", {"tokens": count, "seconds": round(seconds, 3),
                                        "tokens_per_second": round(count / max(seconds, 1e-9), 1),
                                        "stopped": job.stopped, "copies": copies}))

    def check_copies(self, texts: list[str]) -> list[dict] | None:
        """Per candidate: its copied spans as [start, end) character offsets, the longest, and the share."""
        if self.copy_index is None:
            return None
        found = []
        for text in texts:
            # the tokenizer is character-level: token positions of the re-encoded text are character offsets
            copies = find_copies(self.tok.encode(text), self.copy_index, self.min_copy)
            found.append({"spans": copies.spans, "longest": copies.longest, "share": round(copies.share, 4)})
        return found

    def close(self) -> None:
        for job in list(self.waiting) + ([self.running] if self.running else []):
            self.cancel(job)
        self.executor.shutdown(wait=False, cancel_futures=True)


def request_model(limits: Limits, vocab_size: int, defaults: SamplingSettings) -> type[BaseModel]:
    """The body of /api/generate: a prompt and SamplingSettings' options with their bounds, the server's limits
    as the upper ones. ignore_eos is not in it: the server's --ignore_eos holds for every request."""
    highs = {"max_new_tokens": limits.max_new_tokens, "num_samples": MAX_CANDIDATES, "top_k": vocab_size}
    kinds = get_type_hints(SamplingSettings)
    body: dict[str, tuple] = {"prompt": (str, Field(min_length=1, max_length=limits.max_prompt_chars))}
    for f in fields(SamplingSettings):
        if f.name == "ignore_eos":
            continue
        bounds = {("gt" if f.metadata["above"] else "ge"): f.metadata["low"]}
        high = highs.get(f.name, f.metadata["request_high"] if f.metadata["request_high"] is not None
                         else f.metadata["high"])
        if high is not None:
            bounds["le"] = high
        body[f.name] = (kinds[f.name], Field(getattr(defaults, f.name), **bounds))
    # NaN and Infinity are JSON to Python's parser, but no setting: they are refused as not finite
    return create_model("GenerateRequest", __config__=ConfigDict(extra="forbid", allow_inf_nan=False), **body)


class StopRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: str = Field(min_length=1, max_length=64)


def clip(text: str, limit: int = 40) -> str:
    """A piece of a request, safe to put in a short reply: at most limit characters, and valid UTF-8."""
    text = text if len(text) <= limit else text[:limit - 1] + "…"
    return text.encode("utf-8", "backslashreplace").decode("utf-8")  # a lone surrogate becomes \ud800


def validation_message(errors: list[dict]) -> str:
    """Pydantic's errors as one short line: 'max_new_tokens: Input should be less than or equal to 2000 (got
    5000)'. The input is never repeated, only a short finite number, and the names of at most 3 fields."""
    parts = []
    for error in errors[:MAX_ERRORS_SHOWN]:
        if error.get("type") == "json_invalid":
            position = next((p for p in error.get("loc", ()) if isinstance(p, int)), None)
            parts.append("the body is not valid JSON" + (f" (at character {position})" if position is not None
                                                         else ""))
            continue
        where = ".".join(clip(str(part)) for part in error.get("loc", ()) if part != "body") or "body"
        if where == "body" and error.get("type") == "missing":
            parts.append("the body is empty; send a JSON object")
            continue
        got = error.get("input")
        # a number is shown when it is short: not NaN, not an integer of 400 digits
        number = isinstance(got, float) and math.isfinite(got) or isinstance(got, int) and abs(got) < 10**15
        shown = f" (got {got!r})" if number and not isinstance(got, bool) else ""
        message = MESSAGES.get(error.get("type"), str(error.get("msg", "invalid")))
        parts.append(f"{where}: {clip(message, 200)}{shown}")
    if len(errors) > MAX_ERRORS_SHOWN:
        parts.append(f"and {len(errors) - MAX_ERRORS_SHOWN} more")
    return "; ".join(parts)


def error_reply(status: int, message: str, headers: dict | None = None) -> JSONResponse:
    """Every refusal: {"error": one short line}, and nothing of the request in it."""
    return JSONResponse({"error": clip(message, 500)}, status_code=status, headers=headers)


def split_host(value: str, default_port: int) -> tuple[str, int] | None:
    """'127.0.0.1:8000' or '[::1]' as (host, port); None for what is not a host and port."""
    if not value or any(c in value for c in "/?#@\\ "):
        return None
    try:
        parts = urlsplit("//" + value)
        return (parts.hostname, parts.port or default_port) if parts.hostname else None
    except ValueError:  # a port that is not a number, or out of range
        return None


def same_origin(origin: str, host: tuple[str, int], loopback_names: list[str] | None) -> bool:
    """Whether an Origin header names this server as the request reached it (host and port), or, on loopback,
    another loopback name of it with the same port (http://localhost:PORT for http://127.0.0.1:PORT)."""
    parts = urlsplit(origin)
    if parts.scheme not in ("http", "https") or parts.path or parts.query or parts.username:
        return False  # also "null", the origin of a sandboxed frame or a file:// page
    named = split_host(parts.netloc, 443 if parts.scheme == "https" else 80)
    if named is None or named[1] != host[1]:
        return False
    return named[0] == host[0] or bool(loopback_names) and named[0] in loopback_names and host[0] in loopback_names


def sse(event: str, data: dict) -> str:
    """One server-sent event."""
    return f"event: {event}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n"


def model_description(engine: Engine, name: str) -> str:
    config = engine.model.config
    params = engine.model.get_num_params() / 1e6
    weight = engine.model.lm_head.weight
    return (f"{name} · {config.n_layer} layers, {params:.1f}M parameters · "
            f"{weight.device.type} {str(weight.dtype).removeprefix('torch.')}")


def create_app(model: torch.nn.Module | Engine, tok: Tokenizer, *, name: str = "model",
               defaults: SamplingSettings | None = None, limits: Limits = Limits(),
               copy_index: CopyIndex | None = None, min_copy: int = DEFAULT_MIN_COPY,
               allowed_hosts: list[str] | None = None) -> FastAPI:
    """The writing page and its API around one loaded model. No socket is opened here (tests use it as is).

    GET / (the page), GET /api/info, POST /api/generate (server-sent events), POST /api/stop."""
    engine = model if isinstance(model, Engine) else Engine(model)
    defaults = defaults or SamplingSettings(max_new_tokens=200)
    GenerateRequest = request_model(limits, tok.vocab_size, defaults)
    state: dict[str, Scheduler] = {}

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        scheduler = state["scheduler"] = Scheduler(engine, tok, copy_index, min_copy)
        worker = asyncio.create_task(scheduler.run())
        loop = asyncio.get_running_loop()
        # for Server.handle_exit, a signal handler: it may only hand the work to the loop
        app.state.stop_all = lambda: loop.call_soon_threadsafe(scheduler.stop_all)
        try:
            yield
        finally:
            app.state.stop_all = None  # the loop is about to close: a late Ctrl-C has nothing left to stop
            worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await worker  # let the worker close its stream on the generation thread before that thread ends
            scheduler.close()

    app = FastAPI(title="novelgpt writing page", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)

    # the longest body a request within the limits can need: every character of the prompt as a JSON escape
    # (\ud83d\ude00 is 12 bytes), and room for the settings
    max_body = limits.max_prompt_chars * 12 + 4096

    @app.middleware("http")
    async def check_request(request: Request, call_next):
        """The checks every request passes before any route sees it: the host, the origin, and for a request
        that changes state (POST) the way a page of another site could send it, and its size."""
        headers = request.headers
        host = split_host(headers.get("host", ""), 443 if request.url.scheme == "https" else 80)
        # a page on another site cannot reach a loopback server through a DNS name that it controls
        if host is None or allowed_hosts is not None and host[0] not in allowed_hosts:
            return error_reply(400, "this host name is not served; open http://127.0.0.1")
        # A browser names the page that sent a request in Origin (always on a POST, and on any request to
        # another site): only this server's own page is answered.
        if "origin" in headers and not same_origin(headers["origin"], host, allowed_hosts):
            return error_reply(403, "requests from pages of other sites are refused; use this server's own page")
        if request.method not in SAFE_METHODS:
            # A request without Origin (an old browser, a privacy extension) could still come from another
            # site's page, as a form or a text/plain fetch, which browsers send without asking first. So a
            # state-changing request must (1) not be marked cross-site or same-site (another port of
            # localhost) by the browser, and (2) be JSON: a page of another site can send
            # application/json only after a CORS preflight, which this server never grants (no CORS headers),
            # so such a request never leaves the browser. curl and scripts, which send no Origin, still work.
            if headers.get("sec-fetch-site", "same-origin") != "same-origin":
                return error_reply(403, "requests from pages of other sites are refused; use this server's own "
                                        "page")
            if headers.get("content-type", "").split(";")[0].strip().lower() != "application/json":
                return error_reply(415, "send the body as JSON, with Content-Type: application/json")
            # the size before the body is read, so that a huge one is never held in memory
            if "transfer-encoding" in headers:
                return error_reply(411, "send the body with a Content-Length")
            length = headers.get("content-length", "0")
            if not length.isdigit() or int(length) > max_body:
                return error_reply(413, f"the body is larger than this server takes ({max_body:,} bytes; "
                                        f"the prompt is limited to {limits.max_prompt_chars:,} characters)")
        return await call_next(request)

    @app.exception_handler(RequestValidationError)
    async def bad_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        # one handler for every body a route refuses; the input itself never goes back (it may be 10 MB,
        # bytes, NaN or a lone surrogate, none of which a JSON reply can carry)
        return error_reply(422, validation_message(exc.errors()))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        # starlette's own refusals (404, 405, a body that is not UTF-8 JSON) in the same short form
        messages = {400: "the body is not valid JSON in UTF-8", 404: "not found", 405: "method not allowed"}
        return error_reply(exc.status_code, messages.get(exc.status_code, str(exc.detail)), exc.headers)

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/api/info")
    async def info() -> dict:
        scheduler = state["scheduler"]
        return {"queue": {"waiting": len(scheduler.waiting), "running": scheduler.running is not None},
                "model": model_description(engine, name), "block_size": engine.model.config.block_size,
                "defaults": {k: v for k, v in asdict(defaults).items() if k != "ignore_eos"},
                "limits": {**asdict(limits), "max_candidates": MAX_CANDIDATES},
                "copy_check": {"dataset": str(copy_index.folder), "min_copy": min_copy} if copy_index else None}

    @app.post("/api/generate")
    async def generate(body: GenerateRequest) -> StreamingResponse:
        scheduler = state["scheduler"]
        if scheduler.closing:
            return error_reply(503, STOPPING)
        if len(scheduler.waiting) >= limits.max_waiting:
            return error_reply(503, f"{len(scheduler.waiting)} requests are waiting already; try again in a minute")
        seed = body.seed if body.seed is not None else random.SystemRandom().randrange(2**31)
        settings = replace(defaults, **body.model_dump(exclude={"prompt", "seed"}, exclude_unset=True), seed=seed)
        job = Job(body.prompt, settings)
        return StreamingResponse(job_events(scheduler, job), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.post("/api/stop")
    async def stop(body: StopRequest) -> JSONResponse:
        job = state["scheduler"].jobs.get(body.id)
        if job is None:
            return error_reply(404, "no such generation (it may have ended already)")
        state["scheduler"].cancel(job)
        return JSONResponse({"stopped": True})

    return app


async def job_events(scheduler: Scheduler, job: Job) -> AsyncIterator[str]:
    """The event stream of one request: job, queue, start, tokens ..., done (or error). When the client goes
    away the stream is cancelled, and so is its job (the finally clause)."""
    try:
        scheduler.submit(job)
        yield sse("job", {"id": job.id, "seed": job.settings.seed, "ahead": scheduler.ahead_of(job)})
        while True:
            try:
                event = await asyncio.wait_for(job.events.get(), KEEPALIVE_SECONDS)
            except asyncio.TimeoutError:
                yield ": waiting\n\n"  # a comment: ignored by the page, but it fails if the client is gone
                continue
            if event is None:
                return
            yield sse(*event)
    finally:
        scheduler.cancel(job)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_config(config: dict) -> SamplingSettings:
    """The page's default settings; a one-line UserError for the first option that cannot work."""
    for key, low, high in (("port", 0, 65535), ("num_samples", 1, MAX_CANDIDATES), ("max_prompt_chars", 1, 10**7),
                           ("max_tokens_limit", 1, 10**6), ("max_waiting", 1, 10**4), ("min_copy", GRAM, 10**6),
                           ("max_new_tokens", 1, config["max_tokens_limit"])):
        if not low <= config[key] <= high:
            raise UserError(f"--{key} must be between {low} and {high}, got {config[key]}")
    settings = SamplingSettings.from_config(config)
    try:
        settings.check()
    except ValueError as e:
        raise UserError(f"--{e}") from None
    return settings


def listen(host: str, port: int) -> socket.socket:
    """A listening socket, so that a busy port is a one-line error and port 0 reports the port it got."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        return socket.create_server((host.strip("[]"), port), family=family)
    except OSError as e:
        hint = "; choose another --port" if e.errno == errno.EADDRINUSE else ""
        # create_server adds the address to strerror; a host name that does not resolve is a gaierror
        reason = e.strerror if isinstance(e, socket.gaierror) else os.strerror(e.errno) if e.errno else str(e)
        raise UserError(f"cannot listen on {host}:{port}: {reason}{hint}") from None


class Server(uvicorn.Server):
    """uvicorn's server, which on Ctrl-C or SIGTERM first ends every generation of the app (create_app's),
    so that their streams close within the grace period instead of being cancelled mid-response."""

    def handle_exit(self, sig: int, frame: object) -> None:
        super().handle_exit(sig, frame)
        stop_all = getattr(self.config.app.state, "stop_all", None)
        if stop_all:
            stop_all()


def main(argv: list[str] | None = None) -> None:
    """The command line: load the model, open the page's address, serve until Ctrl-C."""
    try:
        config = get_config(DEFAULTS, argv, ALIASES, types=TYPES)
        defaults = check_config(config)
        default_out = not config["init_from"] and config["out_dir"] == DEFAULTS["out_dir"]
        writer = load_writer(config, newest_fallback=default_out, compile_note="the first request waits for it")
        engine, tok, path = writer.engine, writer.tok, writer.path
        copy_index = writer.copy_index() if config["copy_check"] else None
        if defaults.top_k > tok.vocab_size:  # every request from the page, which starts with it, would get 422
            raise UserError(f"--top_k must be at most {tok.vocab_size} (the vocabulary size; 0 = off), "
                            f"got {defaults.top_k}")
        writer.mix_memory(config)
        loopback = is_loopback(config["host"])
        allowed = ["127.0.0.1", "localhost", "::1"] if loopback else None
        app = create_app(engine, tok, name=str(path), defaults=defaults, copy_index=copy_index,
                         min_copy=config["min_copy"], allowed_hosts=allowed,
                         limits=Limits(config["max_prompt_chars"], config["max_tokens_limit"], config["max_waiting"]))
        sock = listen(config["host"], config["port"])
    except UserError as e:
        exit_with_error(e)
    if not loopback:
        print(f"warning: --host {config['host']} lets other machines use this server and its model, with no "
              "password; exposing it is at your own risk", file=sys.stderr)
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    print(f"writing page: http://{shown}:{port}/  (Ctrl-C stops)", flush=True)
    server = Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=3))
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn shuts down cleanly, then passes the Ctrl-C on
        pass
    print("stopped", file=sys.stderr)


if __name__ == "__main__":
    main()
