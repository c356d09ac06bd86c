"""Threads chosen at start: one per free core, an explicit choice wins, bad values name themselves."""

from __future__ import annotations

import os

import pytest
import torch

from promptcache.errors import PromptCacheError
from promptcache.models import threads
from promptcache.models.threads import THREADS_ENV, choose_threads, configure_threads, parse_threads


@pytest.fixture(autouse=True)
def keep_torch_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("cores, busy, expected", [
    (2, 0.0, 2),      # idle: every core, as torch's default
    (2, 0.3, 2),
    (2, 0.6, 1),      # most of one core taken: one thread
    (2, 1.0, 1),
    (2, 7.5, 1),      # heavily loaded: never fewer than one
    (8, 3.0, 5),
    (8, 0.0, 8),
    (4, None, 4),     # load unknown: torch's default
])
def test_one_thread_per_free_core(cores, busy, expected):
    assert choose_threads(cores, busy) == expected


def test_an_explicit_count_wins_over_the_environment_and_the_load(monkeypatch):
    monkeypatch.setenv(THREADS_ENV, "2")
    monkeypatch.setattr(threads, "busy_cores", lambda cores: pytest.fail("the load is not measured"))
    choice = configure_threads(1)
    assert (choice.threads, choice.reason, torch.get_num_threads()) == (1, "--threads", 1)
    choice = configure_threads()
    assert (choice.threads, choice.reason, torch.get_num_threads()) == (2, f"${THREADS_ENV}", 2)


def test_without_a_choice_the_load_decides(monkeypatch):
    monkeypatch.delenv(THREADS_ENV, raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(threads, "usable_cores", lambda: 2)
    monkeypatch.setattr(threads, "busy_cores", lambda cores: 1.7)
    choice = configure_threads()
    assert (choice.threads, choice.busy, torch.get_num_threads()) == (1, 1.7, 1)
    assert "1.7" in choice.describe() and "1 thread of 2 cores" in choice.describe()
    monkeypatch.setattr(threads, "busy_cores", lambda cores: 0.1)
    assert configure_threads().threads == 2


def test_omp_num_threads_is_left_as_torch_read_it(monkeypatch):
    monkeypatch.delenv(THREADS_ENV, raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setattr(threads, "busy_cores", lambda cores: pytest.fail("the load is not measured"))
    torch.set_num_threads(1)
    assert configure_threads().reason == "$OMP_NUM_THREADS"


@pytest.mark.parametrize("value", [0, -1, "two", "1.5"])
def test_a_bad_count_names_the_flag_and_the_value(value):
    with pytest.raises(PromptCacheError, match=rf"--threads must be a whole number of threads >= 1, got {value!r}"):
        parse_threads(value, "--threads")


def test_a_bad_environment_value_names_the_variable(monkeypatch):
    monkeypatch.setenv(THREADS_ENV, "lots")
    with pytest.raises(PromptCacheError, match=rf"\${THREADS_ENV} must be .* got 'lots'"):
        configure_threads()


def test_the_measured_load_is_a_share_of_the_machine():
    busy = threads.busy_cores(threads.usable_cores(), sample_s=0.05)
    assert busy is None or 0.0 <= busy <= (os.cpu_count() or 1) + 1e-9
