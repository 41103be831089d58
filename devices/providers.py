"""Execution providers: which onnxruntime provider runs a model, and why.

`resolve` is a pure function of what onnxruntime reports and what the model
needs, so it is tested with fake availability lists. An explicit device that
cannot be met fails loudly with what is available; `auto` walks a fixed order
(GPUs, then NPUs, CPU last) and records one line per provider it considered.

What each provider can run (as of onnxruntime 1.32):
  * contrib ops (`com.microsoft.MatMulNBits`, `GroupQueryAttention`) run on CPU
    and CUDA; DirectML runs MatMulNBits for 4-bit weights only, and only in
    some onnxruntime-directml builds;
  * NPUs (QNN, CoreML, OpenVINO) run standard ONNX ops only, so a model that
    needs contrib ops would run almost entirely on the CPU fallback: `auto`
    skips them and an explicit request is refused;
  * fp16 graphs are for GPUs and NPUs. The CPU provider of onnxruntime 1.32 has fp16 kernels for
    MatMulNBits, GroupQueryAttention and the (Skip)SimplifiedLayerNormalization ops, not for plain
    MatMul or elementwise ops (onnxruntime casts those to fp32 and back): `auto` skips it, an
    explicit `--device cpu` runs an fp16 model (the parity check of the gpu profile), slowly.

onnxruntime is imported only inside the functions that talk to it, so importing
this module (e.g. for `edge-infer --help`) stays cheap.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from edge_infer.contract.errors import UserError

if TYPE_CHECKING:
    from edge_infer.devices.ort import ort as onnxruntime

CPU = "CPUExecutionProvider"


@dataclass(frozen=True)
class Provider:
    """One execution provider edge-infer knows."""

    name: str  # short name users type: "cuda"
    ort_name: str  # onnxruntime's name: "CUDAExecutionProvider"
    kind: str  # "gpu" | "npu" | "cpu"
    contrib_ops: str  # "all": MatMulNBits + GroupQueryAttention; "int4": MatMulNBits only at 4 bits; "none"
    fp16: bool  # runs fp16 graphs with native kernels
    install: str  # how to get a build that has it
    note: str  # one line for `edge-infer devices`
    options: Mapping[str, str] = field(default_factory=dict)  # onnxruntime provider options


# The order is also the order `auto` tries them in: GPUs, then NPUs, CPU last.
PROVIDERS: tuple[Provider, ...] = (
    Provider("cuda", "CUDAExecutionProvider", "gpu", "all", True, "install onnxruntime-gpu",
             "NVIDIA GPU; runs int4/int8 and fp16 models"),
    Provider("dml", "DmlExecutionProvider", "gpu", "int4", True, "install onnxruntime-directml, Windows only",
             "DirectX 12 GPU; fp16 models, int4 MatMulNBits in some builds"),
    Provider("coreml", "CoreMLExecutionProvider", "npu", "none", True, "use the macOS onnxruntime wheel",
             "Apple Neural Engine / GPU; standard ONNX ops only", {"ModelFormat": "MLProgram"}),
    Provider("openvino", "OpenVINOExecutionProvider", "npu", "none", True,
             "a separate environment with onnxruntime-openvino instead of onnxruntime (`make npu-venv`)",
             "Intel NPU / GPU / CPU (openvino:NPU|GPU|CPU; bare: the best one present); standard ONNX ops only"),
    Provider("qnn", "QNNExecutionProvider", "npu", "none", True,
             "pip install onnxruntime-qnn (a plugin for onnxruntime >= 1.24.2; `make qnn-venv`)",
             "Qualcomm Hexagon NPU (HTP; simulated on x86 Linux); standard ops, static shapes",
             # The HTP computes float graphs in fp16; the QNN provider then needs a SoC model (60: a
             # Snapdragon 8 Gen 3 class HTP). Without these options an fp32 graph fails to finalize.
             {"backend_type": "htp", "enable_htp_fp16_precision": "1", "soc_model": "60"}),
    Provider("cpu", CPU, "cpu", "all", False, "every onnxruntime build has it",
             "any CPU; int4/int8 (MatMulNBits) and fp32 models"),
)  # fmt: skip
BY_NAME: Mapping[str, Provider] = {p.name: p for p in PROVIDERS}


@dataclass(frozen=True)
class ModelTraits:
    """What a model needs from a provider (read from its manifest, never probed)."""

    dtype: str = "fp32"  # activations: "fp32" | "fp16"
    contrib_ops: bool = True  # uses com.microsoft ops (MatMulNBits, GroupQueryAttention)
    quant_bits: int | None = None  # MatMulNBits weight bits (4 or 8); None for float weights
    static_shapes: bool = False  # fixed-shape graphs (the npu export profile)

    def __post_init__(self) -> None:
        if self.dtype not in ("fp32", "fp16"):
            raise UserError(f"model dtype {self.dtype!r} is not supported: expected fp32 or fp16")
        if self.quant_bits not in (None, 4, 8):
            raise UserError(f"model quantization bits {self.quant_bits!r} is not supported: expected 4, 8 or none")


@dataclass(frozen=True)
class DevicePlan:
    """The providers to open a session with, in priority order, and why."""

    device: str  # short name of the provider that runs the model
    providers: tuple[str, ...]  # onnxruntime names, CPU last as fallback for nodes the device lacks
    provider_options: tuple[Mapping[str, str], ...]  # one per provider
    reasons: tuple[str, ...]  # one line per provider considered

    def session_providers(self) -> list[tuple[str, dict[str, str]]]:
        """The `providers=` argument for onnxruntime.InferenceSession."""
        return [(name, dict(opts)) for name, opts in zip(self.providers, self.provider_options)]


FP16_ON_CPU = ("fp16 on the CPU provider: onnxruntime runs plain MatMul and elementwise ops in fp32 with casts "
               "around them; correct but slower than the default export (use it for checks)")


def unsuitable(provider: Provider, model: ModelTraits, explicit: bool = False) -> str | None:
    """Why `provider` cannot run `model`, or None if it can. explicit: the user named this provider
    (an fp16 model then runs on the CPU too)."""
    if model.dtype == "fp16" and not provider.fp16 and not (explicit and provider.kind == "cpu"):
        return (
            "fp16 models are for GPUs and NPUs (on the CPU provider onnxruntime casts most ops to fp32; "
            "`--device cpu` runs one anyway, slowly); use an fp32, int8 or int4 export on CPU"
        )
    if model.contrib_ops and provider.contrib_ops == "none":
        return (
            f"{provider.ort_name} runs standard ONNX ops only and this model uses contrib ops "
            "(MatMulNBits, GroupQueryAttention); export the model without contrib ops for this device"
        )
    if provider.name == "qnn" and not model.static_shapes:
        return (
            "QNN compiles fixed shapes and this model's graph has dynamic shapes; "
            "export it with `edge-infer export SRC -o OUT --profile npu`"
        )
    if model.contrib_ops and provider.contrib_ops == "int4" and model.quant_bits == 8:
        return (
            f"{provider.ort_name} runs MatMulNBits for 4-bit weights only and this model is int8; "
            "use an int4 or fp16 export"
        )
    return None


def resolve(requested: str, available: Sequence[str], model: ModelTraits,
            openvino_devices: Sequence[str] | None = None) -> DevicePlan:
    """Pick the provider for `model` given `available` (onnxruntime.get_available_providers()).

    requested: "auto" or a short name from PROVIDERS. Raises UserError when an
    explicit device is missing or unsuitable, for an unknown name, and when no
    available provider can run the model. openvino_devices: what OpenVINO reports
    (["CPU", "GPU.0", ...]; None: asked when OpenVINO is planned without `:DEVICE`).
    """
    name, _, option = requested.strip().partition(":")
    name = name.lower()
    have = set(available)
    if name == "auto":
        return _best_openvino(_auto(have, model), openvino_devices)
    provider = BY_NAME.get(name)
    if provider is None:
        raise UserError(f"unknown device {requested!r}: use auto or one of {', '.join(BY_NAME)}")
    if provider.ort_name not in have:
        raise UserError(
            f"device {name!r} is not available: {provider.ort_name} is not in this onnxruntime build "
            f"({provider.install}); available here: {_names(have)}"
        )
    why = unsuitable(provider, model, explicit=True)
    if why is not None:
        can = [p.name for p in PROVIDERS if p.ort_name in have and unsuitable(p, model) is None]
        raise UserError(
            f"device {name!r} cannot run this model: {why}; devices here that can: {', '.join(can) or 'none'}"
        )
    reasons = [f"{name}: requested"] + ([f"{name}: {FP16_ON_CPU}"] if model.dtype == "fp16" and not provider.fp16 else [])
    plan = _plan(provider, have, reasons)
    return with_option(plan, provider, option) if option else _best_openvino(plan, openvino_devices)


OPENVINO_ORDER = ("NPU", "GPU", "CPU")  # a bare `--device openvino` takes the first one present


def _best_openvino(plan: DevicePlan, devices: Sequence[str] | None) -> DevicePlan:
    """`plan` with OpenVINO's device_type set to the best device present (NPU, GPU, then CPU), saying
    which: onnxruntime-openvino's own AUTO:NPU,GPU,CPU does not start at all where one is missing."""
    if plan.device != "openvino" or "device_type" in plan.provider_options[0]:
        return plan
    if devices is None:
        from edge_infer.devices.accelerators import openvino_devices

        devices = openvino_devices()
    found = [d for d in OPENVINO_ORDER if any(x.split(".")[0].upper() == d for x in devices)]
    best = found[0] if found else "CPU"
    why = (f"openvino: device_type={best}, the best OpenVINO device here (order {', '.join(OPENVINO_ORDER)}; "
           f"OpenVINO reports {', '.join(devices) or 'none'}); --device openvino:NPU|GPU|CPU picks one")
    options = (dict(plan.provider_options[0], device_type=best),) + plan.provider_options[1:]
    return DevicePlan(plan.device, plan.providers, options, plan.reasons + (why,))


# The provider option that `--device NAME:VALUE` sets.
DEVICE_OPTION = {"openvino": ("device_type", ("CPU", "GPU", "NPU")), "qnn": ("backend_type", ("htp", "gpu"))}


def with_option(plan: DevicePlan, provider: Provider, value: str) -> DevicePlan:
    """`plan` with the provider option of `--device NAME:VALUE` (openvino:NPU, qnn:htp)."""
    key, allowed = DEVICE_OPTION.get(provider.name, (None, ()))
    canon = {a.lower(): a for a in allowed}.get(value.lower())
    if key is None or canon is None:
        choices = ", ".join(f"{n}:{a}" for n, (_, al) in DEVICE_OPTION.items() for a in al)
        raise UserError(f"device option '{provider.name}:{value}' is not known; use one of {choices}")
    options = (dict(plan.provider_options[0], **{key: canon}),) + plan.provider_options[1:]
    return DevicePlan(plan.device, plan.providers, options, plan.reasons + (f"{provider.name}: {key}={canon}",))


def _auto(have: set[str], model: ModelTraits) -> DevicePlan:
    reasons = []
    for provider in PROVIDERS:
        if provider.ort_name not in have:
            missing = f"{provider.ort_name} is not in this onnxruntime build ({provider.install})"
            reasons.append(f"{provider.name}: skipped, {missing}")
            continue
        why = unsuitable(provider, model)
        if why is not None:
            reasons.append(f"{provider.name}: skipped, {why}")
            continue
        reasons.append(f"{provider.name}: chosen, the first available provider in the order {', '.join(BY_NAME)}")
        return _plan(provider, have, reasons)
    raise UserError("no device here can run this model: " + "; ".join(reasons))


def _plan(provider: Provider, have: set[str], reasons: list[str]) -> DevicePlan:
    names, options = [provider.ort_name], [dict(provider.options)]
    if provider.ort_name != CPU and CPU in have:
        # onnxruntime places shape arithmetic and any node the device has no kernel for here.
        names.append(CPU)
        options.append({})
        reasons.append(f"cpu: fallback only, for nodes {provider.name} has no kernel for")
    if provider.name == "cuda":
        reasons.append("cuda: the KV cache stays in GPU memory (shared-buffer exports: bound by address, only ids "
                       "in and logits out per pass); CUDA graphs off (a decode step's mask grows each step)")
    if provider.kind == "gpu" and provider.contrib_ops == "int4":
        reasons.append(
            f"{provider.name}: MatMulNBits support depends on the onnxruntime build; check the session's node placement"
        )
    return DevicePlan(provider.name, tuple(names), tuple(options), tuple(reasons))


def _names(have: set[str]) -> str:
    known = [p.name for p in PROVIDERS if p.ort_name in have]
    other = sorted(have - {p.ort_name for p in PROVIDERS})
    return ", ".join(known + other) or "none"


def available_providers() -> list[str]:
    """The providers this onnxruntime build has, in its own order."""
    from edge_infer.devices.accelerators import register_plugins
    from edge_infer.devices.ort import ort as onnxruntime

    have = list(onnxruntime.get_available_providers())
    return have + [p for p in register_plugins() if p not in have]


def allowed_cpus() -> list[int] | None:
    """The logical CPUs this process may run on; None where the platform does not say."""
    try:
        return sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return None


def physical_cores() -> int:
    """Physical cores this process may run on (SMT siblings counted once); os.cpu_count() when unknown."""
    cpus = allowed_cpus()
    if cpus is None:
        return os.cpu_count() or 1
    cores = set()
    for cpu in cpus:
        topology = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology")
        try:
            package = (topology / "physical_package_id").read_text().strip()
            cores.add((package, (topology / "core_id").read_text().strip()))
        except OSError:
            return len(cpus) or os.cpu_count() or 1
    return len(cores) or 1


_shared_pool_threads: int | None = None  # size of the process-wide pool, once made


def share_threads(threads: int | None = None) -> int:
    """Make the process-wide onnxruntime thread pool (once; later calls keep its size) and return its size.

    Sessions created with `cpu_session_options(shared=True)` run on it. Two models that take
    turns (a draft and its target) then use the same threads: with a pool each, the threads of
    the one that just ran keep spinning and take cores from the other (a draft round measured
    1.8x slower), and without spinning every run pays the threads' wake-up.
    """
    global _shared_pool_threads
    from edge_infer.devices.ort import ort as onnxruntime

    _check_threads(threads)
    if _shared_pool_threads is None:
        n = threads or physical_cores()
        onnxruntime.set_global_thread_pool_sizes(n, 1)
        _shared_pool_threads = n
    return _shared_pool_threads


def shared_pool_size() -> int | None:
    """The size of the process-wide thread pool once `share_threads` made it, else None."""
    return _shared_pool_threads


def _check_threads(threads) -> None:
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise UserError(
            f"threads={threads!r} is not valid: use a positive number, or leave it unset for the "
            f"physical core count ({physical_cores()} here)"
        )


def cpu_session_options(threads: int | None = None, *, allow_spinning: bool = True,
                        shared: bool = False) -> onnxruntime.SessionOptions:
    """Session options for decoding on the CPU.

    intra-op threads = physical cores by default (one thread per core beats SMT
    siblings for these memory-bound MatMuls), one inter-op thread and sequential
    execution (a decoder graph is a chain), every graph optimization.
    allow_spinning=False trades a little latency for idle CPU between steps
    (a server waiting for requests). shared=True runs the session on the
    process-wide pool of `share_threads` (made with `threads` if it does not exist yet).
    Once that pool exists, onnxruntime refuses sessions with a pool of their own, so every
    later session joins it too (with the pool's size, whatever `threads` says).
    """
    from edge_infer.devices.ort import ort as onnxruntime

    _check_threads(threads)
    options = onnxruntime.SessionOptions()
    if shared or _shared_pool_threads is not None:
        share_threads(threads)
        options.use_per_session_threads = False
    else:
        options.intra_op_num_threads = threads or physical_cores()
        options.inter_op_num_threads = 1
    options.execution_mode = onnxruntime.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if allow_spinning else "0")
    return options


@dataclass(frozen=True)
class DeviceRow:
    """One row of the `edge-infer devices` table."""

    name: str
    provider: str
    kind: str
    available: str  # "yes" | "no"
    note: str


def describe(available: Sequence[str] | None = None) -> list[DeviceRow]:
    """Every known provider, whether this build has it, and what it is for."""
    have = set(available_providers() if available is None else available)
    return [
        DeviceRow(p.name, p.ort_name, p.kind, "yes" if p.ort_name in have else "no",
                  p.note if p.ort_name in have else f"{p.note} ({p.install})")
        for p in PROVIDERS
    ]  # fmt: skip
