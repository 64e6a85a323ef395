"""The test suite's own process setup: what each xdist worker's torch may use."""

from __future__ import annotations

import os

import conftest
import torch


def test_each_xdist_worker_takes_its_share_of_the_cores_and_passes_it_to_its_subprocesses(monkeypatch):
    threads = torch.get_num_threads()
    monkeypatch.setattr(conftest, "cpu_count", lambda: 4)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    try:
        for workers, share in (("2", 2), ("3", 1), ("8", 1)):
            monkeypatch.setenv("PYTEST_XDIST_WORKER_COUNT", workers)
            monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
            conftest.pytest_configure(None)
            assert torch.get_num_threads() == share
            assert os.environ["OMP_NUM_THREADS"] == str(share)
    finally:
        torch.set_num_threads(threads)


def test_a_users_thread_setting_for_subprocesses_is_kept(monkeypatch):
    threads = torch.get_num_threads()
    monkeypatch.setattr(conftest, "cpu_count", lambda: 4)
    monkeypatch.setenv("PYTEST_XDIST_WORKER_COUNT", "2")
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    try:
        conftest.pytest_configure(None)
        assert os.environ["OMP_NUM_THREADS"] == "3"
    finally:
        torch.set_num_threads(threads)


def test_without_workers_torch_keeps_its_threads(monkeypatch):
    monkeypatch.delenv("PYTEST_XDIST_WORKER_COUNT", raising=False)
    monkeypatch.setattr(torch, "set_num_threads", lambda n: (_ for _ in ()).throw(AssertionError(n)))
    conftest.pytest_configure(None)
