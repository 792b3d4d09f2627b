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

import torch
import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field, create_model

from configurator import Options, UserError, exit_with_error, get_config
from copycheck import DEFAULT_MIN_COPY, GRAM, CopyIndex, find_copies
from engine import Engine, SamplingSettings
from startup import load_generator
from tokenizer import Tokenizer

STATIC = Path(__file__).resolve().parent / "static"
FRAME_SECONDS = 0.015  # tokens generated within one frame go out as one event: fewer, fuller messages
KEEPALIVE_SECONDS = 5.0  # a waiting request sends a comment this often, so a vanished client is noticed
MAX_CANDIDATES = 4

TYPES = dict(compile=bool)  # keys whose default None means auto
DEFAULTS = Options(
    out_dir=("out", "the best checkpoint, out_dir/ckpt.pt, is served"),
    init_from=("", "or a GPT2-Chinese / Hugging Face GPT-2 folder, or a .pt checkpoint file"),
    vocab=("", "vocab.txt for an --init_from folder (defaults to the folder's vocab.txt)"),
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
    device=("auto", "auto, cpu, cuda, cuda:1, mps, or a GPU index such as 0 or 1"),
    dtype=("auto", "auto, float32, bfloat16, float16"),
    quantize=("none", "int8: int8 weights with per-channel scales, for faster decoding on a CPU"),
    compile=(None, "torch.compile the one-token decode step; None: auto (on for CUDA on Linux)"),
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
    return create_model("GenerateRequest", __config__=ConfigDict(extra="forbid"), **body)


class StopRequest(BaseModel):
    id: str = Field(min_length=1, max_length=64)


def validation_message(errors: list[dict]) -> str:
    """Pydantic's errors as one line: 'max_new_tokens: Input should be less than or equal to 2000 (got 5000)'."""
    parts = []
    for error in errors:
        where = ".".join(str(part) for part in error.get("loc", ()) if part != "body") or "body"
        got = error.get("input")
        shown = f" (got {got!r})" if isinstance(got, (int, float)) and not isinstance(got, bool) else ""
        parts.append(f"{where}: {error.get('msg', 'invalid')}{shown}")
    return "; ".join(parts)


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
        try:
            yield
        finally:
            worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await worker  # let the worker close its stream on the generation thread before that thread ends
            scheduler.close()

    app = FastAPI(title="novelgpt writing page", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)

    @app.middleware("http")
    async def check_host(request: Request, call_next):
        # a page on another site cannot reach a loopback server through a DNS name that it controls
        host = request.headers.get("host", "").rsplit(":", 1)[0].strip("[]")
        if allowed_hosts is not None and host not in allowed_hosts:
            return JSONResponse({"error": f"host {host!r} is not served; open http://127.0.0.1"}, status_code=400)
        return await call_next(request)

    @app.exception_handler(RequestValidationError)
    async def bad_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [{k: v for k, v in e.items() if k in ("loc", "msg", "type", "input")} for e in exc.errors()]
        return JSONResponse({"error": validation_message(errors), "detail": errors}, status_code=422)

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
        if len(scheduler.waiting) >= limits.max_waiting:
            return JSONResponse({"error": f"{len(scheduler.waiting)} requests are waiting already; "
                                          "try again in a minute"}, status_code=503)
        seed = body.seed if body.seed is not None else random.SystemRandom().randrange(2**31)
        settings = replace(defaults, **body.model_dump(exclude={"prompt", "seed"}, exclude_unset=True), seed=seed)
        job = Job(body.prompt, settings)
        return StreamingResponse(job_events(scheduler, job), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.post("/api/stop")
    async def stop(body: StopRequest) -> JSONResponse:
        job = state["scheduler"].jobs.get(body.id)
        if job is None:
            return JSONResponse({"error": "no such generation (it may have ended already)"}, status_code=404)
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


def main(argv: list[str] | None = None) -> None:
    """The command line: load the model, open the page's address, serve until Ctrl-C."""
    try:
        config = get_config(DEFAULTS, argv, ALIASES, types=TYPES)
        defaults = check_config(config)
        default_out = not config["init_from"] and config["out_dir"] == DEFAULTS["out_dir"]
        gen = load_generator(config["init_from"] or config["out_dir"], vocab=config["vocab"], device=config["device"],
                             dtype=config["dtype"], compile=config["compile"], quantize=config["quantize"],
                             newest_fallback=default_out, compile_note="the first request waits for it")
        engine, tok, path = gen.engine, gen.tok, gen.path
        copy_index = gen.copy_index() if config["copy_check"] else None
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
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=1))
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn shuts down cleanly, then passes the Ctrl-C on
        pass
    print("stopped", file=sys.stderr)


if __name__ == "__main__":
    main()
