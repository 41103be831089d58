"""serve/registry.py: models loaded on first use, kept for --keep-alive, unloaded least recently used
first under --max-loaded / --max-memory; waiting for a load, failing a load. Fake loaders and a
hand-moved clock, so every step is deterministic (one test runs the real sweeper thread)."""

from __future__ import annotations

import threading
import time

import pytest

from edge_infer.contract.errors import ModelFileError, UserError
from edge_infer.serve.registry import CHAT, Loaded, ModelRegistry, RegistryError, RegistrySettings


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Fake:
    """A loader that records loads and closes; `gate` holds a load until set; `broken` names fail."""

    def __init__(self, sizes: dict[str, int]):
        self.sizes = sizes
        self.loads: list[str] = []
        self.closed: list[str] = []
        self.gate = threading.Event()
        self.gate.set()
        self.broken: set[str] = set()

    def load(self, name: str) -> Loaded:
        self.gate.wait(10)
        if name in self.broken:
            raise ModelFileError(f"{name}/model.onnx.data: sha256 does not match manifest.json")
        self.loads.append(name)
        return Loaded(CHAT, f"engine:{name}:{len(self.loads)}", lambda: self.closed.append(name))

    def registry(self, clock=None, **settings) -> ModelRegistry:
        def canonical(name: str) -> str:
            if not name or "/" in name:
                raise UserError("not a valid model name")
            return name if ":" in name else name + ":latest"

        return ModelRegistry(lambda: sorted(self.sizes), canonical, self.load, lambda n: self.sizes[n],
                             RegistrySettings(**settings), clock=clock or Clock())


SIZES = {"a:latest": 100, "b:latest": 100, "c:latest": 100, "big:latest": 1000}


def test_a_model_loads_on_first_use_and_is_shared():
    fake = Fake(SIZES)
    reg = fake.registry()
    with reg.acquire("a") as one, reg.acquire("a:latest") as two:
        assert one.handle == two.handle == "engine:a:latest:1" and one.kind == CHAT
    assert fake.loads == ["a:latest"] and reg.status("a:latest") == "loaded" and reg.status("b:latest") == "unloaded"


def test_keep_alive_counts_from_the_last_request():
    clock = Clock()
    fake = Fake(SIZES)
    reg = fake.registry(clock, keep_alive_s=60)
    first, second = reg.acquire("a"), reg.acquire("a")
    first.release()
    clock.now += 1000
    assert reg.sweep() == []  # still in use by the second request
    second.release()
    assert reg.snapshot()["a:latest"]["unloads_in_s"] == 60
    clock.now += 59
    assert reg.sweep() == [] and fake.closed == []
    clock.now += 1
    assert reg.sweep() == ["a:latest"] and fake.closed == ["a:latest"] and reg.status("a:latest") == "unloaded"
    with reg.acquire("a") as again:  # loads again on the next request
        assert again.handle == "engine:a:latest:2"


def test_keep_alive_zero_unloads_at_once_and_negative_never():
    clock = Clock()
    fake = Fake(SIZES)
    zero, never = fake.registry(clock, keep_alive_s=0), fake.registry(clock, keep_alive_s=-1)
    zero.acquire("a").release()
    assert zero.sweep() == ["a:latest"]
    never.acquire("b").release()
    clock.now += 1e9
    assert never.sweep() == [] and never.status("b:latest") == "loaded"


def test_a_request_sets_the_keep_alive_after_it():
    """A request's keep_alive (Lease.keep_alive) replaces the server's for the time after that request:
    0 unloads after it, negative never, seconds; the next request without one gets the server's again."""
    clock = Clock()
    fake = Fake(SIZES)
    reg = fake.registry(clock, keep_alive_s=60)
    with reg.acquire("a") as lease:
        lease.keep_alive(0)
    assert reg.sweep() == ["a:latest"]
    with reg.acquire("b") as lease:
        lease.keep_alive(-1)
    clock.now += 1e6
    assert reg.sweep() == [] and reg.snapshot()["b:latest"]["unloads_in_s"] is None
    with reg.acquire("b") as lease:
        lease.keep_alive(3600)
    assert reg.snapshot()["b:latest"]["unloads_in_s"] == 3600
    reg.acquire("b").release()  # no keep_alive of its own: the server's 60 s
    assert reg.snapshot()["b:latest"]["unloads_in_s"] == 60
    first, second = reg.acquire("b"), reg.acquire("b")
    first.keep_alive(0)
    first.release()
    assert reg.sweep() == []  # still in use: the last request to finish decides
    second.release()
    clock.now += 60
    assert reg.sweep() == ["b:latest"]


def test_max_loaded_unloads_the_least_recently_used_idle_model():
    clock = Clock()
    fake = Fake(SIZES)
    reg = fake.registry(clock, max_loaded=2)
    for name in ("a", "b"):
        reg.acquire(name).release()
        clock.now += 1
    reg.acquire("a").release()  # a is now the more recent
    clock.now += 1
    with reg.acquire("c"):
        assert fake.closed == ["b:latest"]
        assert set(reg.handles()) == {"a:latest", "c:latest"}
        held = reg.acquire("a")
        with pytest.raises(RegistryError) as busy:  # both loaded models in use: nothing to unload
            reg.acquire("b")
        assert busy.value.status == 503 and busy.value.code == "models_busy" and busy.value.retry
        held.release()


def test_max_memory_is_checked_against_the_estimates_before_loading():
    clock = Clock()
    fake = Fake(SIZES)
    reg = fake.registry(clock, max_memory=250)
    reg.acquire("a").release()
    clock.now += 1
    reg.acquire("b").release()
    clock.now += 1
    reg.acquire("c").release()  # 300 > 250: the least recently used (a) goes first
    assert fake.closed == ["a:latest"] and set(reg.handles()) == {"b:latest", "c:latest"}
    with pytest.raises(RegistryError) as too_big:
        reg.acquire("big")
    assert too_big.value.status == 507 and "'big:latest'" in too_big.value.message
    assert "big:latest" not in fake.loads and set(reg.handles()) == {"b:latest", "c:latest"}  # nothing unloaded


def test_an_unknown_model_is_a_404_listing_the_served_names():
    reg = Fake(SIZES).registry()
    for name in ("nope", "a/b", ""):
        with pytest.raises(RegistryError) as e:
            reg.acquire(name)
        assert e.value.status == 404 and e.value.code == "model_not_found" and "'a:latest'" in e.value.message


def test_requests_for_a_model_being_loaded_wait_for_the_one_load():
    fake = Fake(SIZES)
    fake.gate.clear()
    reg = fake.registry(load_timeout_s=30)
    got: list = []
    threads = [threading.Thread(target=lambda: got.append(reg.acquire("a").handle)) for _ in range(3)]
    for t in threads:
        t.start()
    while reg.status("a:latest") != "loading":
        time.sleep(0.001)
    fake.gate.set()
    for t in threads:
        t.join(10)
    assert got == ["engine:a:latest:1"] * 3 and fake.loads == ["a:latest"]


def test_a_wait_for_a_load_is_bounded():
    clock = Clock()
    fake = Fake(SIZES)
    fake.gate.clear()
    reg = fake.registry(clock, load_timeout_s=5)
    loader = threading.Thread(target=lambda: reg.acquire("a"))
    loader.start()
    while reg.status("a:latest") != "loading":
        time.sleep(0.001)
    errors: list[RegistryError] = []

    def wait():
        try:
            reg.acquire("a")
        except RegistryError as e:
            errors.append(e)

    waiter = threading.Thread(target=wait)
    waiter.start()
    for _ in range(1000):  # the clock runs on until the waiter gives up (about one real second: its poll)
        if not waiter.is_alive():
            break
        clock.now += 10
        time.sleep(0.01)
    waiter.join(10)
    e = errors[0]
    assert e.status == 503 and e.code == "model_loading" and e.retry and "'a:latest'" in e.message
    fake.gate.set()
    loader.join(10)


def test_a_failed_load_names_the_model_for_everyone_waiting_and_is_retried_later():
    fake = Fake(SIZES)
    fake.broken.add("a:latest")
    fake.gate.clear()
    reg = fake.registry()
    errors: list[RegistryError] = []

    def ask():
        try:
            reg.acquire("a")
        except RegistryError as e:
            errors.append(e)

    threads = [threading.Thread(target=ask) for _ in range(2)]
    for t in threads:
        t.start()
    while reg.status("a:latest") != "loading":
        time.sleep(0.001)
    time.sleep(0.01)  # let the second request reach its wait (either order gives the same answer)
    fake.gate.set()
    for t in threads:
        t.join(10)
    assert len(errors) == 2 and all(e.status == 500 and e.code == "model_load_failed" for e in errors)
    assert all("model 'a:latest' failed to load" in e.message and "sha256" in e.message for e in errors)
    assert reg.status("a:latest") == "unloaded"
    fake.broken.clear()
    with reg.acquire("a") as ok:
        assert ok.handle == "engine:a:latest:1"


def test_the_sweeper_thread_unloads_after_keep_alive():
    fake = Fake(SIZES)
    reg = ModelRegistry(lambda: sorted(SIZES), lambda n: n, fake.load, lambda n: 1,
                        RegistrySettings(keep_alive_s=0.05))
    reg.start()
    try:
        reg.acquire("a:latest").release()
        for _ in range(2000):  # polled, no wall-clock assert: it unloads, whenever the thread runs
            if reg.status("a:latest") == "unloaded":
                break
            time.sleep(0.005)
        assert reg.status("a:latest") == "unloaded" and fake.closed == ["a:latest"] and reg.unloads == ["a:latest"]
    finally:
        reg.close()


def test_close_unloads_everything_and_refuses_new_requests():
    fake = Fake(SIZES)
    reg = fake.registry()
    reg.acquire("a").release()
    reg.acquire("b")
    reg.close()
    assert sorted(fake.closed) == ["a:latest", "b:latest"]
    with pytest.raises(RegistryError) as e:
        reg.acquire("a")
    assert e.value.status == 503


@pytest.mark.parametrize("bad", [dict(max_loaded=0), dict(max_memory=0), dict(load_timeout_s=0)])
def test_settings_are_checked(bad):
    with pytest.raises(UserError):
        RegistrySettings(**bad).validate()
