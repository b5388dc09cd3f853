"""What an export runs beside its writing (`dfs_merge.export.overlap`): a call in a thread or deferred to when it
is asked for, shards fsynced in the background, a gate that keeps large tensors apart from a background load,
and whether a core is free for any of it."""

from __future__ import annotations

import os
import threading
import time

import pytest

from dfs_merge.export.overlap import Background, Flusher, MemoryGate, spare_core


def test_background_runs_beside_and_hands_over_its_value():
    started = threading.Event()
    where = []

    def work():
        where.append(threading.current_thread().name)
        started.set()
        return [1, 2]

    with Background(work, name="dfs-merge-test") as job:
        assert started.wait(10)  # running before anyone asked for it
        assert job.result() == [1, 2] and job.beside and job.seconds >= 0
        assert job.result() is None  # handed over: the job keeps no reference to it
    assert where == ["dfs-merge-test"]


def test_background_deferred_runs_in_the_caller_when_asked():
    where = []
    job = Background(lambda: where.append(threading.current_thread().name) or 7, beside=False)
    assert where == []
    with job:
        assert job.result() == 7
    assert where == [threading.current_thread().name]
    never = Background(lambda: where.append("ran"), beside=False)
    with never:  # never asked for: never run
        pass
    assert where == [threading.current_thread().name]


@pytest.mark.parametrize("beside", [True, False])
def test_background_raises_its_error_where_it_is_asked_for(beside):
    def fail():
        raise ValueError("no sources")

    with Background(fail, beside=beside) as job, pytest.raises(ValueError, match="no sources"):
        job.result()
    with Background(fail, beside=beside):  # an error nobody asked for is dropped with the block
        pass


def test_leaving_the_block_waits_for_the_thread():
    release = threading.Event()
    done = []

    def work():
        release.wait(10)
        done.append(True)

    with pytest.raises(RuntimeError, match="the writing failed"), Background(work):
        threading.Timer(0.2, release.set).start()
        raise RuntimeError("the writing failed")
    assert done == [True]  # the block's error waited for the thread before it propagated


def test_flusher_fsyncs_and_raises_an_fsync_error(tmp_path):
    shard = tmp_path / "model.safetensors"
    shard.write_bytes(b"x" * 1000)
    with Flusher() as flusher:
        flusher.flush(shard)
        flusher.wait()
        flusher.flush(tmp_path / "gone.safetensors")
        with pytest.raises(FileNotFoundError):
            flusher.wait()
        flusher.wait()  # nothing pending any more


def test_the_gate_keeps_large_tensors_apart_from_a_load():
    gate = MemoryGate(limit=100)
    assert not gate.big(100) and gate.big(101)
    events = []
    loading = threading.Event()

    def load():
        with gate.loading():
            events.append("load starts")
            loading.set()
            time.sleep(0.3)
            events.append("load ends")

    with Background(load):
        time.sleep(0.1)
        assert events == []  # the load waits for the writer to open the gate
        with gate.tensor(1000):  # a large tensor written first: the load waits for it
            gate.open()
            time.sleep(0.1)
            events.append("large tensor")
        assert loading.wait(10)
        with gate.tensor(10):  # a small one goes on beside the load
            events.append("small tensor")
        with gate.tensor(1000):  # a large one waits for the load to end
            events.append("large tensor")
    assert events == ["large tensor", "load starts", "small tensor", "load ends", "large tensor"]


@pytest.mark.parametrize(("cpus", "load", "free"), [(2, 0.6, True), (2, 1.4, True), (2, 1.6, False),
                                                    (2, 4.2, False), (1, 0.0, False), (16, 3.0, True)])
def test_spare_core_reads_the_load_average(cpus, load, free, monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cpus)), raising=False)
    monkeypatch.setattr(os, "getloadavg", lambda: (load, load, load))
    assert spare_core() is free


def test_spare_core_without_a_load_average(monkeypatch):
    def unreadable():
        raise OSError("no load average here")

    monkeypatch.setattr(os, "getloadavg", unreadable)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    assert spare_core()
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0}, raising=False)
    assert not spare_core()
