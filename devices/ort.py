"""The one place edge-infer imports onnxruntime: telemetry is switched off before any session exists.

onnxruntime's official Windows builds can emit telemetry events (ETW); Linux and
macOS builds compile none, and the call is then a no-op. edge-infer never sends
anything anywhere: every module that needs onnxruntime imports it from here.
"""

import onnxruntime as ort

ort.disable_telemetry_events()

__all__ = ["ort"]
