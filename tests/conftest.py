"""Fixtures the test files share: one tiny trained run for the whole session, single-threaded torch, the
environment of a subprocess, a process id nobody has, and a server on a free loopback port."""

import json
import os
import socket
import subprocess
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
import torch
import uvicorn

from novelgpt.checkpoint import checkpoint_state
from novelgpt.copycheck import load_copy_index
from novelgpt.preparing import prepare
from novelgpt.hf import export_folder
from model import GPT, GPTConfig
from serve import create_app
from novelgpt.tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parents[1]
# one thread: the subprocesses share this machine's cores with the test process; UTF-8: they print hanzi
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONIOENCODING="utf-8")
# 56 different characters: in this text each one has a single successor, which a tiny model learns quickly
CYCLE = "天地玄黄宇宙洪荒日月盈昃辰宿列张寒来暑往秋收冬藏闰余成岁律吕调阳云腾致雨露结为霜金生丽水玉出昆冈剑号巨阙珠称夜光"
PROMPT = "天地玄黄"
LOOPBACK = ["127.0.0.1", "localhost", "::1"]  # what serve.py allows as Host on a loopback address


@dataclass
class TinyRun:
    """A dataset prepared from CYCLE and a model trained on it, saved as train.py saves a run."""
    data_dir: Path
    out_dir: Path
    model: GPT
    tok: Tokenizer
    final_loss: float


@pytest.fixture(scope="session")
def run(tmp_path_factory: pytest.TempPathFactory) -> TinyRun:
    """Built once per test session: prepare CYCLE, train ~150 steps, save ckpt.pt."""
    root = tmp_path_factory.mktemp("tiny-run")
    source = root / "cycle.txt"
    source.write_text((CYCLE + "\n") * 100, encoding="utf-8")
    data_dir, out_dir = root / "data", root / "out"
    prepare(str(source), name="cycle", vocab_size=100, block_size=32, data_dir=str(data_dir))
    meta = json.loads((data_dir / "cycle" / "meta.json").read_text(encoding="utf-8"))
    tok = Tokenizer.from_meta(meta)
    train = torch.from_numpy(np.fromfile(data_dir / "cycle" / "train.bin", dtype=meta["dtype"]).astype(np.int64))
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=32, vocab_size=tok.vocab_size, n_layer=1, n_head=2, n_embd=32))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    with single_thread():
        for _ in range(150):
            starts = torch.randint(len(train) - 33, (8,))
            x = torch.stack([train[s:s + 32] for s in starts])  # (8, 32)
            y = torch.stack([train[s + 1:s + 33] for s in starts])
            _, loss = model(x, y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    out_dir.mkdir()
    config = {"dataset": "cycle", "data_dir": str(data_dir), "block_size": 32}
    torch.save(checkpoint_state(model, tok, config, 150, loss.item()), out_dir / "ckpt.pt")
    model.eval()
    return TinyRun(data_dir, out_dir, model, tok, loss.item())


@contextmanager
def single_thread() -> Iterator[None]:
    """Tiny models run faster on one thread, and far faster on a busy machine (no second thread to wait for)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture
def one_thread() -> Iterator[None]:
    with single_thread():
        yield


@pytest.fixture(scope="module")
def one_thread_per_module() -> Iterator[None]:
    """one_thread for a module-scoped fixture, which cannot ask for a function-scoped one."""
    with single_thread():
        yield


@pytest.fixture
def dead_pid() -> int:
    """The id of a process that has exited (and been reaped), as a killed run leaves in its lock file."""
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


def make_app(run: TinyRun, **kwargs):
    """The app as serve.py builds it, with the copy check against the run's dataset."""
    kwargs.setdefault("copy_index", load_copy_index(run.data_dir / "cycle"))
    return create_app(run.model, run.tok, name="tiny", **kwargs)


@contextmanager
def running_server(app) -> Iterator[str]:
    """Serve app with uvicorn on a free loopback port in a thread; yields the base URL."""
    sock = socket.create_server(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=1))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


def gpt2_chinese_folder(model: GPT, folder: Path, fmt: str = "safetensors") -> Path:
    """A model folder as GPT2-Chinese's train.py leaves one: config.json (no token ids) and the weights, no
    vocabulary (GPT2-Chinese keeps that in cache/vocab_small.txt). export_folder writes it, less the rest."""
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    placeholder = Tokenizer(specials + [chr(0x4E00 + i) for i in range(model.config.vocab_size - len(specials))])
    export_folder(model, placeholder, folder, fmt)
    for path in folder.iterdir():
        if path.name not in ("config.json", "model.safetensors", "pytorch_model.bin"):
            path.unlink()
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        config.pop(key)
    (folder / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    return folder
