"""serve.py: the writing page's API on a tiny model trained here. Streaming over a real socket (uvicorn in a
thread), stop and disconnect, the queue, 422 answers, the host check, and the command line with Ctrl-C."""

import json
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Iterator

import httpx
import pytest
from fastapi.testclient import TestClient

from conftest import CYCLE, ENV, PROMPT, ROOT, TinyRun, make_app, running_server
from engine import Engine, SamplingSettings
from serve import Limits, is_loopback
from serve import main as serve_main

pytestmark = pytest.mark.usefixtures("one_thread")


def events(response: httpx.Response) -> Iterator[tuple[str, dict]]:
    """Parse a server-sent event stream as it arrives."""
    name, data = "message", ""
    for line in response.iter_lines():
        if line.startswith("event: "):
            name = line[7:]
        elif line.startswith("data: "):
            data += line[6:]
        elif line == "" and data:
            yield name, json.loads(data)
            name, data = "message", ""


def generate(base: str, body: dict, client: httpx.Client | None = None) -> list[tuple[str, dict]]:
    """POST /api/generate and read the whole stream."""
    with (client or httpx.Client(timeout=30)).stream("POST", f"{base}/api/generate", json=body) as response:
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("text/event-stream")
        return list(events(response))


def texts_of(stream: list[tuple[str, dict]], n: int) -> list[str]:
    texts = [""] * n
    for name, data in stream:
        if name == "tokens":
            for row, piece in data["pieces"]:
                texts[row] += piece
    return texts


def test_the_tiny_model_has_learned_its_text(run: TinyRun):
    assert run.final_loss < 0.2, f"training did not converge (loss {run.final_loss:.3f}); the tests below need it"


def test_page_and_info(run: TinyRun):
    with TestClient(make_app(run, limits=Limits(max_prompt_chars=500, max_new_tokens=300))) as client:
        page = client.get("/")
        assert page.status_code == 200 and "text/html" in page.headers["content-type"]
        for element in ('id="story"', 'id="write"', 'id="stop"', 'id="candidates"', 'class="use"', 'id="status"',
                        'id="seed"', 'id="num_samples"', 'id="top_p"', 'id="repetition_penalty"', 'id="download"'):
            assert element in page.text
        assert "http" not in page.text.replace('http-equiv', ''), "the page must not load anything from the web"
        script = client.get("/static/app.js")
        assert script.status_code == 200 and "/api/generate" in script.text
        info = client.get("/api/info").json()
        assert info["model"].startswith("tiny · 1 layers")
        assert info["limits"] == {"max_prompt_chars": 500, "max_new_tokens": 300, "max_waiting": 32, "max_candidates": 4}
        assert info["copy_check"]["min_copy"] == 12 and info["copy_check"]["dataset"].endswith("cycle")
        assert info["block_size"] == 32


def test_streams_the_continuation_token_by_token(run: TinyRun):
    body = {"prompt": PROMPT, "max_new_tokens": 40, "num_samples": 2, "temperature": 1.0, "top_k": 8, "seed": 7}
    with running_server(make_app(run)) as base:
        stream = generate(base, body)
    names = [name for name, _ in stream]
    assert names[0] == "job" and names[-1] == "done" and "start" in names and names.count("tokens") >= 1
    assert names.index("start") < names.index("tokens")
    # exactly what the engine writes with the same seed, piece by piece and sample by sample
    settings = SamplingSettings(max_new_tokens=40, num_samples=2, temperature=1.0, top_k=8, seed=7)
    expected = list(Engine(run.model).stream_text(run.tok, PROMPT, settings))
    streamed = [tuple(p) for name, data in stream if name == "tokens" for p in data["pieces"]]
    assert streamed == expected
    texts = texts_of(stream, 2)
    assert all(len(t) == 40 for t in texts)
    done = stream[-1][1]
    assert done["tokens"] == 80 and not done["stopped"] and done["tokens_per_second"] > 0


def test_copied_spans_are_reported(run: TinyRun):
    """The model continues its training text verbatim: the copy check marks the whole continuation."""
    body = {"prompt": PROMPT, "max_new_tokens": 30, "temperature": 0}
    with running_server(make_app(run)) as base:
        stream = generate(base, body)
    text = texts_of(stream, 1)[0]
    start = CYCLE.index(PROMPT) + len(PROMPT)
    assert text == (CYCLE + "\n" + CYCLE)[start:start + 30]
    copies = stream[-1][1]["copies"][0]
    assert copies["longest"] == [0, 30] and copies["share"] == 1.0
    with running_server(make_app(run, copy_index=None)) as base:
        assert generate(base, body)[-1][1]["copies"] is None


def test_stop_ends_the_generation_and_frees_the_worker(run: TinyRun):
    app = make_app(run, limits=Limits(max_new_tokens=100_000))
    with running_server(app) as base, httpx.Client(timeout=30) as client:
        long = {"prompt": PROMPT, "max_new_tokens": 100_000, "seed": 1}
        with client.stream("POST", f"{base}/api/generate", json=long) as response:
            stream = events(response)
            job = next(data for name, data in stream if name == "job")
            next(data for name, data in stream if name == "tokens")  # text arrives while it is being written
            t0 = time.monotonic()
            assert client.post(f"{base}/api/stop", json={"id": job["id"]}).json() == {"stopped": True}
            done = next(data for name, data in stream if name == "done")
            assert time.monotonic() - t0 < 2
        assert done["stopped"] and 0 < done["tokens"] < 100_000
        assert client.post(f"{base}/api/stop", json={"id": job["id"]}).status_code == 404
        t0 = time.monotonic()
        assert generate(base, {"prompt": PROMPT, "max_new_tokens": 5}, client)[-1][0] == "done"
        assert time.monotonic() - t0 < 5


def test_a_closed_connection_cancels_its_generation(run: TinyRun):
    app = make_app(run, limits=Limits(max_new_tokens=100_000))
    with running_server(app) as base, httpx.Client(timeout=30) as client:
        with client.stream("POST", f"{base}/api/generate", json={"prompt": PROMPT, "max_new_tokens": 100_000}) as r:
            next(data for name, data in events(r) if name == "tokens")
        # the page went away mid-generation: the worker must be free for the next one soon
        deadline = time.monotonic() + 5
        while client.get(f"{base}/api/info").json()["queue"]["running"]:
            assert time.monotonic() < deadline, "the generation went on after its client left"
            time.sleep(0.05)
        assert texts_of(generate(base, {"prompt": PROMPT, "max_new_tokens": 5}, client), 1)[0]


def test_two_requests_at_once_both_complete_in_turn(run: TinyRun):
    results: dict[int, list] = {}
    with running_server(make_app(run, limits=Limits(max_new_tokens=5000))) as base:
        def ask(k: int) -> None:
            results[k] = generate(base, {"prompt": PROMPT, "max_new_tokens": 600, "num_samples": 2, "seed": k})
        threads = [threading.Thread(target=ask, args=(k,)) for k in (1, 2)]
        for thread in threads:
            thread.start()
            time.sleep(0.2)  # the second one arrives while the first is being written
        for thread in threads:
            thread.join(60)
    for k in (1, 2):
        assert results[k][-1][0] == "done" and results[k][-1][1]["tokens"] == 1200
        assert [len(t) for t in texts_of(results[k], 2)] == [600, 600]
    # the second waited behind the first and was told so
    assert ("queue", {"ahead": 1}) in results[2]


@pytest.mark.parametrize("body, message", [
    ({"prompt": PROMPT, "max_new_tokens": 301}, "max_new_tokens: Input should be less than or equal to 300 (got 301)"),
    ({"prompt": PROMPT, "num_samples": 5}, "num_samples: Input should be less than or equal to 4 (got 5)"),
    ({"prompt": PROMPT, "num_samples": 0}, "num_samples: Input should be greater than or equal to 1 (got 0)"),
    ({"prompt": PROMPT, "temperature": -1}, "temperature: Input should be greater than or equal to 0"),
    ({"prompt": PROMPT, "top_p": 0}, "top_p: Input should be greater than 0"),
    ({"prompt": PROMPT, "repetition_penalty": 0}, "repetition_penalty: Input should be greater than 0"),
    ({"prompt": PROMPT, "top_k": -2}, "top_k: Input should be greater than or equal to 0"),
    ({"prompt": PROMPT, "seed": -1}, "seed: Input should be greater than or equal to 0"),
    ({"prompt": PROMPT, "max_new_tokens": "many"}, "max_new_tokens: Input should be a valid integer"),
    ({"prompt": ""}, "prompt: String should have at least 1 character"),
    ({"prompt": "字" * 501}, "prompt: String should have at most 500 characters"),
    ({"max_new_tokens": 10}, "prompt: Field required"),
    # no request reaches the file system: a model or a path cannot be asked for
    ({"prompt": PROMPT, "out_dir": "/etc"}, "out_dir: Extra inputs are not permitted"),
])
def test_bad_values_get_422_with_a_readable_message(run: TinyRun, body: dict, message: str):
    with TestClient(make_app(run, limits=Limits(max_prompt_chars=500, max_new_tokens=300))) as client:
        response = client.post("/api/generate", json=body)
        assert response.status_code == 422
        assert response.json()["error"].startswith(message)


def test_stop_of_an_unknown_generation_is_404(run: TinyRun):
    with TestClient(make_app(run)) as client:
        response = client.post("/api/stop", json={"id": "nope"})
        assert response.status_code == 404 and "no such generation" in response.json()["error"]


def test_a_full_queue_answers_503(run: TinyRun):
    with running_server(make_app(run, limits=Limits(max_new_tokens=100_000, max_waiting=1))) as base, \
            httpx.Client(timeout=30) as client:
        body = {"prompt": PROMPT, "max_new_tokens": 100_000}
        with client.stream("POST", f"{base}/api/generate", json=body) as first:
            first_events = events(first)  # kept: dropping the reader would close the connection, and the job
            next(data for name, data in first_events if name == "tokens")
            with client.stream("POST", f"{base}/api/generate", json=body) as second:
                second_events = events(second)
                name, data = next(second_events)
                assert name == "job" and data["ahead"] == 1
                with client.stream("POST", f"{base}/api/generate", json=body) as third:
                    assert third.status_code == 503
                    assert "1 requests are waiting already" in json.loads(third.read())["error"]


def test_only_loopback_host_names_are_served_on_loopback(run: TinyRun):
    with TestClient(make_app(run, allowed_hosts=["127.0.0.1", "localhost"]), base_url="http://127.0.0.1") as client:
        assert client.get("/api/info").status_code == 200
        rebound = client.get("/api/info", headers={"host": "attacker.example:8000"})
        assert rebound.status_code == 400 and "not served" in rebound.json()["error"]
    assert is_loopback("127.0.0.1") and is_loopback("localhost") and is_loopback("::1")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.5")


@pytest.mark.slow
def test_command_line_serves_then_stops_cleanly_on_ctrl_c(run: TinyRun):
    process = subprocess.Popen([sys.executable, "serve.py", "--out_dir", str(run.out_dir), "--port=0",
                                "--host=0.0.0.0", "--device=cpu", "--max_new_tokens=20"],
                               cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = process.stdout.readline()
        assert line.startswith("writing page: http://0.0.0.0:"), line + process.stderr.read()
        port = int(re.match(r"writing page: http://0\.0\.0\.0:(\d+)/", line).group(1))
        info = httpx.get(f"http://127.0.0.1:{port}/api/info", timeout=10).json()
        assert info["defaults"]["max_new_tokens"] == 20 and info["copy_check"]["dataset"].endswith("cycle")
        stream = generate(f"http://127.0.0.1:{port}", {"prompt": PROMPT, "temperature": 0})
        assert texts_of(stream, 1)[0] == CYCLE[4:24]
        process.send_signal(signal.SIGINT)
        assert process.wait(10) == 0
    finally:
        process.kill()
    err = process.stderr.read()
    assert "Traceback" not in err
    assert "warning: --host 0.0.0.0 lets other machines use this server" in err
    assert "copy check against" in err and err.rstrip().endswith("stopped")


@pytest.mark.parametrize("args, message", [
    (["--num_samples=5"], "error: --num_samples must be between 1 and 4, got 5"),
    (["--max_new_tokens=3000"], "error: --max_new_tokens must be between 1 and 2000, got 3000"),
    (["--top_p=0"], "error: --top_p must be in (0, 1] (1 = off), got 0.0"),
    (["--out_dir=/nonexistent/run"], "error: no checkpoint at /nonexistent/run/ckpt.pt"),
    (["--colour=red"], "error: unknown option 'colour'"),
])
def test_command_line_errors_are_one_line(args: list[str], message: str, capsys: pytest.CaptureFixture):
    with pytest.raises(SystemExit) as exit_info:
        serve_main(["--port=0", *args])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(message) and err.count("\n") == 1


def test_command_line_busy_port_is_one_line(run: TinyRun, capsys: pytest.CaptureFixture):
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        with pytest.raises(SystemExit):
            serve_main(["--out_dir", str(run.out_dir), f"--port={port}", "--device=cpu", "--copy_check=False"])
    assert capsys.readouterr().err.endswith(f"error: cannot listen on 127.0.0.1:{port}: Address already in use; "
                                            "choose another --port\n")
