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


def session_for(path: str, plan: DevicePlan, options, strict: bool):
    """An InferenceSession for `path` on `plan` (options: onnxruntime SessionOptions)."""
    from edge_infer.devices.ort import ort

    accelerator = plan.providers[0] != "CPUExecutionProvider"
    strict = strict or (accelerator and "CPUExecutionProvider" not in plan.providers)
    if accelerator and strict:
        options.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
    if plan.providers[0] == QNN_EP:
        register_plugins()
        options.add_provider_for_devices(qnn_devices(), dict(plan.provider_options[0]))
        return ort.InferenceSession(path, options)
    providers = plan.session_providers()
    if accelerator and strict:
        providers = providers[:1]
    return ort.InferenceSession(path, options, providers=providers)
