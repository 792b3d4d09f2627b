"""serve.py: the writing page's API on a tiny model trained here. Streaming over a real socket (uvicorn in a
thread), stop and disconnect, the queue, 422 answers, the host and origin checks, short JSON refusals for every bad
request, and the command line with Ctrl-C (quiet mid-stream)."""

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

from conftest import CYCLE, ENV, LOOPBACK, PROMPT, ROOT, TinyRun, make_app, running_server
from novelgpt.engine import Engine, SamplingSettings
from serve import STOPPING, Limits, create_app, is_loopback
from serve import main as serve_main

REFUSED = "requests from pages of other sites are refused; use this server's own page"
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


def assert_short_error(response: httpx.Response, status: int, message: str) -> None:
    """A refusal: the status, and a short JSON object with one line in "error" that starts with message."""
    assert response.status_code == status, response.content[:300]
    assert len(response.content) < 300, f"{len(response.content)} bytes: {response.content[:300]!r}"
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert list(body) == ["error"] and body["error"].startswith(message), body


def assert_no_traceback(capfd: pytest.CaptureFixture) -> None:
    """What the server printed while the test ran (uvicorn logs to stderr): no traceback, no ASGI error."""
    err = capfd.readouterr().err
    for text in ("Traceback", "Exception in ASGI", "CancelledError"):
        assert text not in err, err[-3000:]


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


def test_pages_of_other_sites_are_refused(run: TinyRun, capfd: pytest.CaptureFixture):
    """What a page of another site can send without a CORS preflight (text/plain, a form, multipart, no type)
    and JSON, to every state-changing route, with a foreign Origin: 403. Without Origin: 403 when the browser
    marks it cross-site, 415 when it is not JSON. The server's own page and scripts still work."""
    with running_server(make_app(run, allowed_hosts=LOOPBACK)) as base, httpx.Client(timeout=30) as client:
        port = int(base.rsplit(":", 1)[1])
        body = json.dumps({"prompt": PROMPT, "max_new_tokens": 5})
        simple = [dict(content=body, headers={"Content-Type": "text/plain"}), dict(data={"prompt": PROMPT}),
                  dict(files={"prompt": ("story.txt", PROMPT.encode())}), dict(content=body, headers={})]
        as_json = dict(content=body, headers={"Content-Type": "application/json"})
        foreign = ["http://evil.example.com", f"http://evil.example.com:{port}", "null",
                   f"http://127.0.0.1:{port + 1}", "http://127.0.0.1", f"http://127.0.0.1:{port}/path"]
        for origin in foreign:
            for path in ("/api/generate", "/api/stop"):
                for send in simple + [as_json]:
                    headers = {**send.get("headers", {}), "Origin": origin}
                    request = {k: v for k, v in send.items() if k != "headers"}
                    assert_short_error(client.post(base + path, headers=headers, **request), 403, REFUSED)
        evil = {"Origin": "http://evil.example.com"}
        assert_short_error(client.get(base + "/api/info", headers=evil), 403, REFUSED)
        preflight = client.options(base + "/api/generate", headers={
            **evil, "Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "content-type"})
        assert_short_error(preflight, 403, REFUSED)
        assert not any(name.startswith("access-control-") for name in preflight.headers)
        # no Origin (an old browser, a privacy extension): marked by the browser, or not JSON
        for site in ("cross-site", "same-site"):
            response = client.post(base + "/api/generate", content=body,
                                   headers={"Content-Type": "application/json", "Sec-Fetch-Site": site})
            assert_short_error(response, 403, REFUSED)
        for path in ("/api/generate", "/api/stop"):
            for send in simple:
                assert_short_error(client.post(base + path, **send), 415, "send the body as JSON, with "
                                                                          "Content-Type: application/json")
        assert client.get(base + "/", headers={"Sec-Fetch-Site": "cross-site"}).status_code == 200  # a link
        # this server's own page, under either loopback name, and a script that sends no Origin
        for headers in ({"Origin": base, "Sec-Fetch-Site": "same-origin"}, {"Origin": f"http://localhost:{port}"},
                        {"Content-Type": "application/json; charset=utf-8"}, {}):
            with client.stream("POST", base + "/api/generate", json={"prompt": PROMPT, "max_new_tokens": 5},
                               headers=headers) as response:
                assert response.status_code == 200
                assert list(events(response))[-1][0] == "done"
        assert client.post(base + "/api/stop", json={"id": "gone"}, headers={"Origin": base}).status_code == 404
    assert_no_traceback(capfd)


NAN_BODIES = [(f'{{"prompt": "{PROMPT}", "{name}": {value}}}', 422, f"{name}: Input should be a finite number")
              for name in ("temperature", "top_p", "repetition_penalty") for value in ("NaN", "Infinity", "-Infinity")]


@pytest.mark.parametrize("path, content, status, message", [
    *[("/api/generate", *case) for case in NAN_BODIES],
    ("/api/generate", '{"prompt": "\\ud800abc"}', 422, "prompt: not valid Unicode text (it holds a lone surrogate"),
    ("/api/generate", '{"prompt": "abc", "\\udc00": 1}', 422, "body: not valid Unicode text"),
    ("/api/generate", json.dumps({"prompt": "x" * 10_000_000}), 413,
     "the body is larger than this server takes (10,096 bytes; the prompt is limited to 500 characters)"),
    ("/api/generate", json.dumps({"prompt": "字" * 501}), 422, "prompt: String should have at most 500 characters"),
    ("/api/generate", json.dumps({"prompt": PROMPT, "k" * 5000: 1}), 422, "k" * 39 + "…: Extra inputs"),
    ("/api/generate", json.dumps({"prompt": PROMPT, **{f"k{i}": i for i in range(300)}}), 422,
     "k0: Extra inputs are not permitted (got 0); k1: Extra inputs are not permitted (got 1); k2: Extra inputs "
     "are not permitted (got 2); and 297 more"),
    ("/api/generate", '{"prompt": "a", "max_new_tokens": %s}' % ("9" * 400), 422,
     "max_new_tokens: Input should be less than or equal to 300"),
    ("/api/generate", '{"prompt": "a", "max_new_tokens": %s}' % ("9" * 5000), 400, "the body is not valid JSON in"),
    ("/api/generate", '{"prompt": ', 422, "the body is not valid JSON (at character 11)"),
    ("/api/generate", b'{"prompt": "\xff\xfe"}', 400, "the body is not valid JSON in UTF-8"),
    ("/api/generate", "[1, 2]", 422, "body: Input should be a valid dictionary"),
    ("/api/generate", "", 422, "the body is empty; send a JSON object"),
    ("/api/stop", json.dumps({"id": "x" * 5000}), 422, "id: String should have at most 64 characters"),
    ("/api/stop", '{"id": NaN}', 422, "id: Input should be a valid string"),
    ("/api/stop", '{"id": "\\ud800"}', 422, "id: not valid Unicode text"),
])
def test_bad_requests_get_a_short_json_error(run: TinyRun, capfd: pytest.CaptureFixture, path: str,
                                             content: str | bytes, status: int, message: str):
    """Every bad body gets a 4xx with one short line that never repeats the input, and no traceback."""
    with running_server(make_app(run, limits=Limits(max_prompt_chars=500, max_new_tokens=300))) as base:
        response = httpx.post(base + path, content=content, headers={"Content-Type": "application/json"},
                              timeout=30)
        assert_short_error(response, status, message)
        assert "字字字" not in response.text and "xxx" not in response.text and "999" not in response.text
    assert_no_traceback(capfd)


def test_other_refusals_are_short_json_too(run: TinyRun, capfd: pytest.CaptureFixture):
    """Routes and methods that do not exist, a body of unknown size; and the size limit leaves room for a
    prompt at the limit sent with every character escaped."""
    with running_server(make_app(run, limits=Limits(max_prompt_chars=500))) as base, \
            httpx.Client(timeout=30) as client:
        assert_short_error(client.put(base + "/api/generate", json={"prompt": PROMPT}), 405, "method not allowed")
        assert_short_error(client.get(base + "/api/generate"), 405, "method not allowed")
        assert_short_error(client.get(base + "/api/nothing"), 404, "not found")
        assert_short_error(client.get(base + "/static/nothing.js"), 404, "not found")
        chunked = client.post(base + "/api/generate", content=iter([b'{"prompt": "', PROMPT.encode(), b'"}']),
                              headers={"Content-Type": "application/json"})
        assert_short_error(chunked, 411, "send the body with a Content-Length")
        widest = json.dumps({"prompt": "\U0001F600" * 500, "max_new_tokens": 1}, ensure_ascii=True)
        assert len(widest) > 6000
        with client.stream("POST", base + "/api/generate", content=widest,
                           headers={"Content-Type": "application/json"}) as response:
            assert response.status_code == 200 and list(events(response))[-1][0] == "done"
    assert_no_traceback(capfd)


def test_ctrl_c_during_a_stream_ends_every_stream_quietly(run: TinyRun):
    """The real command line, one stream being written and one waiting behind it: Ctrl-C ends both at once
    with a message, and the terminal shows no traceback."""
    process = subprocess.Popen([sys.executable, "serve.py", "--out_dir", str(run.out_dir), "--port=0",
                                "--device=cpu", "--max_tokens_limit=100000"],
                               cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    waiting: list[tuple[str, dict]] = []
    try:
        line = process.stdout.readline()
        assert line.startswith("writing page: http://127.0.0.1:"), line + process.stderr.read()
        base = re.match(r"writing page: (http://127\.0\.0\.1:\d+)/", line).group(1)
        body = {"prompt": PROMPT, "max_new_tokens": 100_000}

        def wait_behind() -> None:
            with httpx.stream("POST", f"{base}/api/generate", json=body, timeout=30) as second:
                waiting.extend(events(second))

        with httpx.Client(timeout=30) as client, client.stream("POST", f"{base}/api/generate", json=body) as first:
            stream = events(first)
            next(data for name, data in stream if name == "tokens")
            thread = threading.Thread(target=wait_behind)
            thread.start()
            deadline = time.monotonic() + 10
            while client.get(f"{base}/api/info").json()["queue"]["waiting"] != 1:
                assert time.monotonic() < deadline, "the second request did not queue"
                time.sleep(0.05)
            t0 = time.monotonic()
            process.send_signal(signal.SIGINT)
            rest = list(stream)
            assert time.monotonic() - t0 < 2, "the stream did not end at once"
        thread.join(10)
        assert process.wait(10) == 0
    finally:
        process.kill()
    err = process.stderr.read()
    assert ("error", {"message": STOPPING}) in rest
    assert rest[-1][0] == "done" and rest[-1][1]["stopped"] and rest[-1][1]["tokens"] > 0
    assert waiting[-1] == ("error", {"message": STOPPING}) and not any(name == "start" for name, _ in waiting)
    for text in ("Traceback", "Exception in ASGI", "CancelledError", "Cancel "):
        assert text not in err, err
    assert err.rstrip().endswith("stopped")


def test_command_line_top_k_beyond_the_vocabulary_is_one_line(run: TinyRun, capfd: pytest.CaptureFixture):
    """The page starts with the server's --top_k; one that no request may send is refused at start-up."""
    with pytest.raises(SystemExit) as exit_info:
        serve_main(["--out_dir", str(run.out_dir), "--port=0", "--device=cpu", "--copy_check=False",
                    "--top_k=1000"])
    assert exit_info.value.code == 2
    assert capfd.readouterr().err == (f"error: --top_k must be at most {run.tok.vocab_size} (the vocabulary size; "
                                      "0 = off), got 1000\n")


def test_on_the_network_the_origin_must_match_the_host(run: TinyRun, capfd: pytest.CaptureFixture):
    """Served with --host 0.0.0.0 (no Host check), a page opened as http://192.168.1.5:PORT is the server's own
    page there; any other origin, loopback names included, is refused."""
    with running_server(make_app(run, allowed_hosts=None)) as base, httpx.Client(timeout=30) as client:
        port = int(base.rsplit(":", 1)[1])
        body = {"prompt": PROMPT, "max_new_tokens": 5}
        lan = {"Host": f"192.168.1.5:{port}"}
        with client.stream("POST", base + "/api/generate", json=body,
                           headers={**lan, "Origin": f"http://192.168.1.5:{port}"}) as response:
            assert response.status_code == 200 and list(events(response))[-1][0] == "done"
        for headers in ({**lan, "Origin": f"http://localhost:{port}"}, {**lan, "Origin": "http://192.168.1.5"},
                        {"Origin": f"http://192.168.1.5:{port}"}):
            assert_short_error(client.post(base + "/api/generate", json=body, headers=headers), 403, REFUSED)
    assert_no_traceback(capfd)
