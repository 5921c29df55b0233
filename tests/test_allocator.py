"""`mend.keep_freed_memory`: the command line raises glibc's mmap and trim thresholds together, once,
at start; a refused mmap threshold, the switch ``MEND_MALLOC_TUNING=0``, the user's own malloc
settings and a C library that is not glibc leave malloc alone."""

from __future__ import annotations

import sys

import pytest

from mend import allocator
from mend.cli import main


class FakeLibc:
    """Records mallopt calls; ``refuse`` names the parameters whose mallopt fails."""

    def __init__(self, refuse=()):
        self.calls, self.refuse = [], set(refuse)

    def mallopt(self, parameter, value):
        self.calls.append((parameter, value))
        return 0 if parameter in self.refuse else 1


@pytest.fixture
def fake_libc(monkeypatch):
    libc = FakeLibc()
    monkeypatch.setattr(allocator, "_glibc", lambda: libc)
    for name in (allocator.ENV_SWITCH, *allocator.USER_TUNING):
        monkeypatch.delenv(name, raising=False)
    return libc


def test_raises_the_mmap_threshold_then_the_trim_threshold(fake_libc):
    assert allocator.keep_freed_memory(1 << 28)
    assert fake_libc.calls == [(allocator.M_MMAP_THRESHOLD, 1 << 28), (allocator.M_TRIM_THRESHOLD, 1 << 28)]


def test_a_refused_mmap_threshold_leaves_the_trim_threshold_alone(fake_libc):
    fake_libc.refuse.add(allocator.M_MMAP_THRESHOLD)  # an older glibc caps it at 32 MiB
    assert not allocator.keep_freed_memory()
    assert fake_libc.calls == [(allocator.M_MMAP_THRESHOLD, allocator.DEFAULT_THRESHOLD)]


@pytest.mark.parametrize("name", allocator.USER_TUNING)
def test_the_users_own_malloc_settings_win(fake_libc, monkeypatch, name):
    monkeypatch.setenv(name, "65536")
    assert not allocator.keep_freed_memory()
    assert fake_libc.calls == []


@pytest.mark.parametrize("value", ["0", "false", "OFF", " no "])
def test_the_switch_turns_it_off(fake_libc, monkeypatch, value):
    monkeypatch.setenv(allocator.ENV_SWITCH, value)
    assert not allocator.keep_freed_memory()
    assert fake_libc.calls == []


def test_without_glibc_nothing_changes(monkeypatch):
    monkeypatch.setattr(allocator, "_glibc", lambda: None)
    monkeypatch.delenv(allocator.ENV_SWITCH, raising=False)
    assert not allocator.keep_freed_memory()


@pytest.mark.parametrize("threshold", [0, -5, 2**31])
def test_a_threshold_mallopt_cannot_take_is_refused(fake_libc, threshold):
    with pytest.raises(ValueError, match="threshold"):
        allocator.keep_freed_memory(threshold)
    assert fake_libc.calls == []


def test_every_command_line_run_tunes_malloc_first(monkeypatch, tmp_path):
    seen = []
    monkeypatch.setattr(allocator, "keep_freed_memory", lambda: seen.append(True) or True)
    assert main(["train", "train.max_stepz=3", f"train.out_dir={tmp_path}"]) == 1  # a config error, after tuning
    assert seen == [True]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt exists only on Linux")
def test_real_glibc_takes_the_thresholds_or_refuses_cleanly(monkeypatch):
    for name in (allocator.ENV_SWITCH, *allocator.USER_TUNING):
        monkeypatch.delenv(name, raising=False)
    if allocator._glibc() is None:
        pytest.skip("this Linux's C library is not glibc")
    assert allocator.keep_freed_memory() in (True, False)  # False only where glibc refused the first call
    try:
        assert allocator.keep_freed_memory(1 << 20)  # a threshold every glibc takes
    finally:
        allocator.keep_freed_memory()  # the process's setting as the command line leaves it
