"""Execution providers: which onnxruntime provider runs a model, chosen by a pure, explained function."""

from edge_infer.devices.providers import (
    BY_NAME,
    PROVIDERS,
    DevicePlan,
    DeviceRow,
    ModelTraits,
    Provider,
    available_providers,
    cpu_session_options,
    describe,
    physical_cores,
    resolve,
    unsuitable,
)

__all__ = [
    "BY_NAME", "PROVIDERS", "DevicePlan", "DeviceRow", "ModelTraits", "Provider", "available_providers",
    "cpu_session_options", "describe", "physical_cores", "resolve", "unsuitable",
]  # fmt: skip
