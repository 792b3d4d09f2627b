"""runtime.decode_threads: decoding takes the cores other processes leave idle; OMP_NUM_THREADS wins."""

import os
import subprocess
import sys

import pytest
import torch

from novelgpt.runtime import busy_cores, decode_threads


@pytest.mark.slow
def test_a_busy_process_takes_a_core_from_decoding():
    cores = len(os.sched_getaffinity(0))
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        busy_cores(0.3)  # let it start
        assert 0.7 <= busy_cores(0.3) <= os.cpu_count() + 0.01
        assert 1 <= decode_threads() <= max(1, cores - 1)
    finally:
        busy.kill()
        busy.wait()


def test_omp_num_threads_wins(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    threads = torch.get_num_threads()
    assert decode_threads() == threads
