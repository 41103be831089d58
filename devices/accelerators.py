"""Accelerator providers that are not in the plain onnxruntime wheel: OpenVINO and QNN.

* OpenVINO comes as a whole onnxruntime build (`onnxruntime-openvino`), so it lives in an
  environment of its own; its provider option `device_type` picks CPU, GPU or NPU
  (`--device openvino:NPU`).
* QNN comes as a plugin (`onnxruntime-qnn`, for onnxruntime >= 1.24.2): its library is
  registered with `register_execution_provider_library`, its devices come from
  `get_ep_devices()`, and a session adds them with `add_provider_for_devices`. The HTP
  backend (`backend_type` htp) runs on a Snapdragon NPU, and in simulation on x86 Linux.

`session_for` opens a session on a DevicePlan. With `strict` (the default for accelerators),
`session.disable_cpu_ep_fallback` is set: a node the accelerator cannot run is an error at
load, never a silent fallback to the CPU.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from edge_infer.contract.errors import UserError
    from edge_infer.devices.providers import DevicePlan

QNN_PACKAGE = "onnxruntime_qnn"
QNN_LIBRARY = "libonnxruntime_providers_qnn.so"
QNN_EP = "QNNExecutionProvider"
_registered: dict[str, bool] = {}


def qnn_library() -> Path | None:
    """The QNN plugin library of an installed onnxruntime-qnn, found without importing it."""
    spec = importlib.util.find_spec(QNN_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / QNN_LIBRARY
    return path if path.is_file() else None


def register_plugins() -> list[str]:
    """Register the plugin providers installed here (once per process); their onnxruntime names."""
    from edge_infer.devices.ort import ort

    names = []
    lib = qnn_library()
    if lib is not None and hasattr(ort, "register_execution_provider_library"):
        if QNN_EP not in _registered:
            try:
                ort.register_execution_provider_library("QNN", str(lib))
                _registered[QNN_EP] = True
            except Exception:  # an onnxruntime too old for this plugin: it is then simply not available
                _registered[QNN_EP] = False
        if _registered[QNN_EP] and qnn_devices():
            names.append(QNN_EP)
    return names


def openvino_devices() -> list[str]:
    """The devices onnxruntime-openvino sees (["CPU", "GPU.0", "NPU"]); [] without it."""
    from edge_infer.devices.ort import ort

    try:
        from onnxruntime.capi import _pybind_state

        return list(_pybind_state.get_available_openvino_device_ids())
    except (ImportError, AttributeError, RuntimeError):
        return [] if "OpenVINOExecutionProvider" not in ort.get_available_providers() else ["CPU"]


def qnn_devices() -> list:
    from edge_infer.devices.ort import ort

    return [d for d in ort.get_ep_devices() if d.ep_name == "QNN"]


def strict_plan(plan: DevicePlan) -> DevicePlan:
    """`plan` without the CPU fallback when an accelerator runs it: every node must run there."""
    from edge_infer.devices.providers import DevicePlan

    if plan.providers[0] == "CPUExecutionProvider":
        return plan
    reasons = tuple(r for r in plan.reasons if not r.startswith("cpu: fallback only"))
    reasons += (f"cpu: fallback disabled (session.disable_cpu_ep_fallback=1): every node runs on {plan.device} "
                "or the model does not load",)
    return DevicePlan(plan.device, plan.providers[:1], plan.provider_options[:1], reasons)


def session_for(path: str, plan: DevicePlan, options, strict: bool, cache_dir: Path | None = None,
                graph_sha256: str = ""):
    """An InferenceSession for `path` on `plan` (options: onnxruntime SessionOptions).

    cache_dir: where compiled contexts are kept (None: compile every time). QNN writes an
    EPContext model (`<graph>_ctx.onnx` + its `.bin`) there once and loads it afterwards;
    OpenVINO gets it as its `cache_dir` for compiled blobs.
    """
    from edge_infer.devices.native_output import stdout_to_stderr

    with stdout_to_stderr():  # provider libraries' chatter (QNN's `# LIBNATIVE: ...`) stays off stdout
        return _session_for(path, plan, options, strict, cache_dir, graph_sha256)


def _session_for(path: str, plan: DevicePlan, options, strict: bool, cache_dir: Path | None, graph_sha256: str):
    from edge_infer.devices.ort import ort

    accelerator = plan.providers[0] != "CPUExecutionProvider"
    strict = strict or (accelerator and "CPUExecutionProvider" not in plan.providers)
    if accelerator and strict:
        options.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
    if plan.providers[0] == QNN_EP:
        register_plugins()
        options.add_provider_for_devices(qnn_devices(), dict(plan.provider_options[0]))
        if cache_dir is not None:
            return _qnn_with_context(path, plan, options, cache_dir, graph_sha256)
        return ort.InferenceSession(path, options)
    providers = plan.session_providers()
    if accelerator and strict:
        providers = providers[:1]
    if cache_dir is not None and plan.providers[0] == "OpenVINOExecutionProvider":
        providers[0] = (providers[0][0], dict(providers[0][1], cache_dir=str(cache_dir / "openvino")))
    return ort.InferenceSession(path, options, providers=providers)


def did_not_start(plan: DevicePlan) -> UserError | None:
    """The error for a session that failed on `plan` when its provider itself did not start, else None."""
    from edge_infer.contract.errors import UserError

    why = provider_start_failure(plan)
    if why is None:
        return None
    return UserError(f"device {plan.device} did not start, so nothing ran on it ({why})"
                     + ("; --device openvino:CPU (or :GPU) picks another OpenVINO device" if plan.device == "openvino"
                        else "; --device cpu runs the model without it"))


def provider_start_failure(plan: DevicePlan) -> str | None:
    """Why `plan`'s provider does not start here, in its own words, or None when it starts.

    A one-node standard-op graph (Add) is opened on the provider alone with the CPU fallback off
    and onnxruntime's log captured: if even that fails, the provider itself did not start (a
    missing device or library), whatever a model's session then said about its nodes.
    """
    from onnx import TensorProto, helper

    from edge_infer.devices.native_output import captured_stderr, stdout_to_stderr
    from edge_infer.devices.ort import ort

    if plan.providers[0] == "CPUExecutionProvider":
        return None
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])
    graph = helper.make_graph([helper.make_node("Add", ["x", "x"], ["y"])], "start", [x], [y])
    model = helper.make_model(graph, ir_version=9, opset_imports=[helper.make_opsetid("", 17)])
    options = ort.SessionOptions()
    options.log_severity_level = 2  # warnings: where a provider that fails to start says why
    options.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
    one = plan.__class__(plan.device, plan.providers[:1], plan.provider_options[:1], plan.reasons)
    with captured_stderr() as log, stdout_to_stderr():
        try:
            if one.providers[0] == QNN_EP:
                register_plugins()
                options.add_provider_for_devices(qnn_devices(), dict(one.provider_options[0]))
                ort.InferenceSession(model.SerializeToString(), options)
            else:
                ort.InferenceSession(model.SerializeToString(), options, providers=one.session_providers())
            error = None
        except Exception as e:  # onnxruntime's own Fail types
            error = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    said = [line for line in log.lines if "fallback to CPU EP" not in line]
    if error is None or ("fallback to CPU EP" in error and not any("Failed to create" in s for s in said)):
        return None  # it started (and, at most, has no kernel for Add: the model's nodes are the question)
    return f"{plan.providers[0]}: " + ("; ".join(dict.fromkeys(said)) or error)


def provider_version(plan: DevicePlan) -> str:
    """What a compiled context depends on: onnxruntime's version and the plugin package's."""
    from importlib.metadata import PackageNotFoundError, version

    from edge_infer.devices.ort import ort

    parts = [f"onnxruntime {ort.__version__}"]
    if plan.providers[0] == QNN_EP:
        try:
            parts.append(f"onnxruntime-qnn {version('onnxruntime-qnn')}")
        except PackageNotFoundError:
            parts.append("onnxruntime-qnn unknown")
    return ", ".join(parts)


def _qnn_with_context(path: str, plan: DevicePlan, options, cache_dir: Path, graph_sha256: str):
    """Load `path`'s QNN EPContext from cache_dir, or compile it once and keep it there.

    The context is keyed by the graph's sha256, the provider options and versions: a new
    onnxruntime or onnxruntime-qnn, or other options, compile a new one. `context.json` beside
    it records the sha256 of each file, checked before every use.
    """
    import hashlib
    import json
    import os
    import shutil

    from edge_infer.devices.ort import ort

    stem = Path(path).stem
    record = {"graph": Path(path).name, "graph_sha256": graph_sha256, "provider": QNN_EP,
              "provider_version": provider_version(plan), "options": dict(plan.provider_options[0])}
    key = hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:16]
    folder = cache_dir / f"qnn-{stem}-{key}"
    ctx = folder / f"{stem}_ctx.onnx"
    if _context_valid(folder):
        return ort.InferenceSession(str(ctx), options)
    tmp = cache_dir / f".qnn-{stem}-{key}.{os.getpid()}.tmp"
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    except OSError:  # a read-only model folder: compile every time
        return ort.InferenceSession(path, options)
    options.add_session_config_entry("ep.context_enable", "1")
    options.add_session_config_entry("ep.context_file_path", str(tmp / ctx.name))
    options.add_session_config_entry("ep.context_embed_mode", "0")
    session = ort.InferenceSession(path, options)
    files = {p.name: _sha256(p) for p in sorted(tmp.iterdir()) if p.is_file()}
    (tmp / "context.json").write_text(json.dumps({**record, "files": files}, indent=2) + "\n")
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)
    return session


def _context_valid(folder: Path) -> bool:
    import json

    try:
        record = json.loads((folder / "context.json").read_text())
        return bool(record["files"]) and all(_sha256(folder / n) == h for n, h in record["files"].items())
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _sha256(path: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    return h.hexdigest()
