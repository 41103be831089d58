"""Whether onnxruntime's threads spin, from other processes' use of the cores (devices/contention.py)."""

from __future__ import annotations

import gc
import subprocess
import sys
import time
import weakref

import pytest

from edge_infer.contract.errors import UserError
from edge_infer.devices import contention
from edge_infer.devices.contention import CpuSample, Spinning, Watch, busy_seconds, choose, others_cores, requested

STAT = """cpu  900 0 300 5000 10 0 5 7 0 0
cpu0 100 10 50 2000 5 0 2 3 0 0
cpu1 400 0 100 1000 5 0 3 4 0 0
cpu2 300 0 150 2000 0 0 0 0 0 0
intr 12345
"""


def test_busy_seconds_reads_the_allowed_cpus_lines():
    # cpu0: user 100 + nice 10 + system 50 + irq 0 + softirq 2 + steal 3 = 165 ticks; cpu1: 400+100+3+4 = 507
    assert busy_seconds(STAT, [0, 1], 100.0) == pytest.approx(6.72)
    assert busy_seconds(STAT, [2], 100.0) == pytest.approx(4.5)
    assert busy_seconds(STAT, [0, 5], 100.0) is None  # a CPU we may run on that /proc/stat does not list


def test_others_cores_takes_our_own_time_out():
    start = CpuSample(wall=10.0, busy=100.0, own=3.0, cpus=2)
    end = CpuSample(wall=12.0, busy=103.0, own=4.0, cpus=2)  # 3 s busy in 2 s: 1 s of it ours
    assert others_cores(start, end) == pytest.approx(1.0)
    assert others_cores(start, CpuSample(12.0, 101.0, 6.0, 2)) == 0.0  # never below 0


def test_choose_stops_spinning_only_where_others_take_the_threads_cores():
    assert choose("auto", 2, 0.1, 2).on
    assert not choose("auto", 2, 1.0, 2).on
    assert "1.0 of 2 CPUs" in choose("auto", 2, 1.0, 2).reason
    assert choose("auto", 1, 1.0, 2).on  # one thread, and a core left for it
    assert choose("auto", 2, 0.5, 2).on  # half a core taken: spinning still paid (1.13x)
    assert not choose("auto", 1, 1.9, 2).on
    assert choose("auto", 8, 0.4, 8).on
    measured_nothing = choose("auto", 2, None, 0)
    assert measured_nothing.on and "could not be read" in measured_nothing.reason
    forced = choose("off", 2, 0.0, 2, "EDGE_INFER_SPIN=off")
    assert not forced.on and forced.forced and "EDGE_INFER_SPIN=off" in forced.describe()


def test_requested(monkeypatch):
    monkeypatch.delenv(contention.ENV, raising=False)
    assert requested(None) == ("auto", "EDGE_INFER_SPIN=auto")
    assert requested(False) == ("off", "allow_spinning=False")
    monkeypatch.setenv(contention.ENV, "on")
    assert requested(None)[0] == "on"
    assert requested(False)[0] == "off"  # the argument wins over the environment
    monkeypatch.setenv(contention.ENV, "sometimes")
    with pytest.raises(UserError, match="EDGE_INFER_SPIN='sometimes'.*auto, on, off"):
        requested(None)


def _busy_process():
    return subprocess.Popen([sys.executable, "-c", "import time\nend = time.time() + 20\nwhile time.time() < end: pass"])


@pytest.mark.skipif(contention.sample() is None, reason="needs /proc/stat (Linux)")
def test_a_busy_process_is_seen_and_our_own_work_is_not():
    busy = _busy_process()
    try:
        time.sleep(0.3)  # the interpreter has started and spins
        start = contention.sample()
        time.sleep(0.3)
        seen = others_cores(start, contention.sample())
    finally:
        busy.kill()
        busy.wait()
    assert seen >= 0.5, seen  # about one core (less only on a machine that starves it)
    start = contention.sample()
    end = time.monotonic() + 0.3
    while time.monotonic() < end:  # this process busy: our own time is taken out
        pass
    assert others_cores(start, contention.sample()) < seen


def _spin_entry(model) -> str:
    return model.session.get_session_options().get_session_config_entry("session.intra_op.allow_spinning")


def test_load_spins_unless_asked_or_crowded(tiny_exports, monkeypatch):
    from edge_infer.runtime.model import load

    folder = tiny_exports("llama", "int4")
    monkeypatch.setenv(contention.ENV, "off")
    m = load(folder, device="cpu")
    assert _spin_entry(m) == "0" and m.spinning.forced and "EDGE_INFER_SPIN=off" in m.describe_spinning()
    m = load(folder, device="cpu", allow_spinning=True)
    assert _spin_entry(m) == "1" and m.spinning.forced
    monkeypatch.delenv(contention.ENV)
    if contention.sample() is None:
        return
    cpus = len(contention.allowed_cpus() or [0])
    monkeypatch.setattr(contention, "MIN_WINDOW_S", 0.3)  # 60 ticks over 2 CPUs: a busy core reads 1.0 +- 0.05
    busy = _busy_process()
    try:
        time.sleep(0.3)
        m = load(folder, device="cpu", threads=cpus)  # a thread per CPU, one CPU taken: no spinning
    finally:
        busy.kill()
        busy.wait()
    assert _spin_entry(m) == "0" and not m.spinning.forced, m.describe_spinning()
    assert m.spinning.others is not None and m.spinning.others >= 0.5


class FakeCpus:
    """A sampler over two CPUs where other processes keep `others` cores busy; one second per sample."""

    def __init__(self, others: float = 0.0):
        self.others, self.wall, self.busy = others, 0.0, 0.0

    def __call__(self) -> CpuSample:
        self.wall += 1.0
        self.busy += self.others
        return CpuSample(self.wall, self.busy, 0.0, 2)


def test_watch_changes_the_spinning_after_enough_idle_windows_disagree():
    cpus = FakeCpus(others=1.0)
    watch = Watch(2, True, window_s=0.0, confirm=3, sampler=cpus)
    assert watch.poll() is None  # no window open yet
    watch.idle()
    assert [watch.poll() for _ in range(2)] == [None, None]
    change = watch.poll()
    assert change is not None and not change.on and "1.0 of 2 CPUs" in change.reason
    watch.now_on(False)
    assert [watch.poll() for _ in range(4)] == [None] * 4  # a busy machine agrees with not spinning
    cpus.others = 0.0
    assert [watch.poll() for _ in range(2)] == [None, None]
    cpus.others = 1.0  # one window that agrees again: the count starts over
    assert watch.poll() is None
    cpus.others = 0.0
    assert [watch.poll() for _ in range(2)] == [None, None]
    watch.busy()  # a window the model ran in does not count: it reads the others low
    assert watch.poll() is None
    watch.idle()
    change = watch.poll()
    assert change is not None and change.on


def test_respin_reopens_the_session_with_the_same_bits_and_frees_the_old_one(tiny_exports, monkeypatch):
    import numpy as np

    from edge_infer.runtime.model import load

    monkeypatch.delenv(contention.ENV, raising=False)
    folder = tiny_exports("llama", "int4")
    m = load(folder, device="cpu", threads=2)
    assert m.respinnable
    ids = np.array([[5, 9, 2, 7, 3]], dtype=np.int64)
    cache = m.new_cache()
    before = m.forward(ids, cache).copy()
    step = m.forward(np.array([[4]], dtype=np.int64), cache).copy()
    old = weakref.ref(m.session._sess)  # onnxruntime's own session, which an IOBinding holds (and its weights)
    was = _spin_entry(m)
    m.respin(Spinning(was == "0", "a test"))
    assert _spin_entry(m) == ("1" if was == "0" else "0") and m.spinning.reason == "a test"
    gc.collect()
    assert old() is None  # the cache's binding to the old session went with it: its weights are freed
    fresh = m.new_cache()
    assert np.array_equal(m.forward(ids, fresh), before)
    assert np.array_equal(m.forward(np.array([[4]], dtype=np.int64), fresh), step)
    cache.trim(ids.shape[1])  # the cache bound to the old session runs on the new one
    assert np.array_equal(m.forward(np.array([[4]], dtype=np.int64), cache), step)
    forced = load(folder, device="cpu", allow_spinning=True)
    assert not forced.respinnable
    with pytest.raises(UserError, match="fixed"):
        forced.respin(Spinning(False, "a test"))
