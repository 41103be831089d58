"""Device resolution as a pure function over fake availability lists."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from edge_infer.devices import (
    ModelTraits,
    available_providers,
    cpu_session_options,
    describe,
    physical_cores,
    resolve,
)
from edge_infer.contract.errors import UserError

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
DML = "DmlExecutionProvider"
QNN = "QNNExecutionProvider"
COREML = "CoreMLExecutionProvider"

INT4 = ModelTraits(dtype="fp32", contrib_ops=True, quant_bits=4)
INT8 = ModelTraits(dtype="fp32", contrib_ops=True, quant_bits=8)
FP16 = ModelTraits(dtype="fp16", contrib_ops=True)
FP16_STANDARD = ModelTraits(dtype="fp16", contrib_ops=False, static_shapes=True)  # the npu profile


def test_auto_picks_cuda_when_present():
    plan = resolve("auto", [QNN, CUDA, CPU], INT4)
    assert plan.device == "cuda"
    assert plan.providers == (CUDA, CPU)
    assert plan.reasons[0].startswith("cuda: chosen")
    assert plan.session_providers() == [(CUDA, {}), (CPU, {})]
    assert any(r.startswith("cuda: the KV cache stays in GPU memory") for r in plan.reasons)


def test_auto_cpu_only_explains_every_skip():
    plan = resolve("auto", [CPU], INT4)
    assert plan.device == "cpu" and plan.providers == (CPU,)
    assert plan.reasons[0] == (
        "cuda: skipped, CUDAExecutionProvider is not in this onnxruntime build (install onnxruntime-gpu)"
    )
    assert [r.split(":")[0] for r in plan.reasons] == ["cuda", "dml", "coreml", "openvino", "qnn", "cpu"]
    assert plan.reasons[-1].startswith("cpu: chosen")


def test_auto_skips_npus_for_contrib_op_models():
    plan = resolve("auto", [QNN, COREML, CPU], INT4)
    assert plan.device == "cpu"
    qnn = next(r for r in plan.reasons if r.startswith("qnn:"))
    assert "skipped" in qnn and "standard ONNX ops only" in qnn and "MatMulNBits" in qnn
    assert any(r.startswith("coreml: skipped") for r in plan.reasons)


def test_auto_uses_npu_for_standard_op_models():
    plan = resolve("auto", [QNN, CPU], FP16_STANDARD)
    assert plan.device == "qnn"
    assert plan.providers == (QNN, CPU)
    assert plan.provider_options[0]["backend_type"] == "htp"


def test_cpu_always_last():
    for available in ([CPU, CUDA], [CPU, DML, CUDA], [CPU, QNN], [CPU]):
        for traits in (INT4, FP16, FP16_STANDARD):
            try:
                plan = resolve("auto", available, traits)
            except UserError:
                continue
            assert plan.providers[-1] == CPU
            assert plan.providers.count(CPU) == 1


def test_explicit_unavailable_device_lists_what_is_available():
    with pytest.raises(UserError) as err:
        resolve("cuda", [CPU, DML], INT4)
    msg = str(err.value)
    assert "CUDAExecutionProvider is not in this onnxruntime build" in msg
    assert "install onnxruntime-gpu" in msg
    assert "available here: dml, cpu" in msg


def test_unknown_name_lists_known_names():
    with pytest.raises(UserError) as err:
        resolve("tpu", [CPU], INT4)
    assert str(err.value) == "unknown device 'tpu': use auto or one of cuda, dml, coreml, openvino, qnn, cpu"


def test_fp16_on_cpu_only_is_skipped_by_auto_and_run_when_asked():
    with pytest.raises(UserError) as err:
        resolve("auto", [CPU], FP16)
    msg = str(err.value)
    assert "no device here can run this model" in msg and "fp16 models are for GPUs and NPUs" in msg
    plan = resolve("cpu", [CPU], FP16)  # the gpu profile's parity check runs it (tests/test_gpu_profile.py)
    assert plan.device == "cpu" and any("fp16 on the CPU provider" in r for r in plan.reasons)
    assert resolve("auto", [CUDA, CPU], FP16).device == "cuda"


def test_explicit_npu_refused_for_contrib_ops_with_alternatives():
    with pytest.raises(UserError) as err:
        resolve("qnn", [QNN, CPU], INT4)
    assert "standard ONNX ops only" in str(err.value)
    assert "devices here that can: cpu" in str(err.value)


def test_dml_int4_only():
    assert resolve("auto", [DML, CPU], INT4).device == "dml"
    plan = resolve("auto", [DML, CPU], INT8)
    assert plan.device == "cpu"
    assert any(r.startswith("dml: skipped") and "4-bit weights only" in r for r in plan.reasons)


def test_explicit_request_is_case_insensitive():
    plan = resolve(" CPU ", [CPU, CUDA], INT8)
    assert plan.device == "cpu" and plan.providers == (CPU,)
    assert plan.reasons == ("cpu: requested",)


def test_invalid_traits():
    with pytest.raises(UserError, match="bf16"):
        ModelTraits(dtype="bf16")
    with pytest.raises(UserError, match="bits"):
        ModelTraits(quant_bits=3)


def test_describe_rows():
    rows = describe([CPU, CUDA])
    assert [r.name for r in rows] == ["cuda", "dml", "coreml", "openvino", "qnn", "cpu"]
    assert {r.name: r.available for r in rows}["cuda"] == "yes"
    assert {r.name: r.available for r in rows}["qnn"] == "no"
    assert "onnxruntime-qnn" in rows[4].note
    assert describe()[-1].available == "yes"  # the real build has the CPU provider


def test_available_providers_real_build():
    assert CPU in available_providers()


def test_cpu_session_options(monkeypatch):
    import onnxruntime as ort

    from edge_infer.devices import providers

    monkeypatch.setattr(providers, "_shared_pool_threads", None)  # as in a process that never shared its threads
    opts = cpu_session_options()
    assert opts.intra_op_num_threads == physical_cores() >= 1
    assert physical_cores() <= (os.cpu_count() or 1)
    assert opts.inter_op_num_threads == 1
    assert opts.execution_mode == ort.ExecutionMode.ORT_SEQUENTIAL
    assert opts.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    assert opts.get_session_config_entry("session.intra_op.allow_spinning") == "1"
    opts = cpu_session_options(3, allow_spinning=False)
    assert opts.intra_op_num_threads == 3
    assert opts.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    for bad in (0, -1, 1.5, True):
        with pytest.raises(UserError, match="threads"):
            cpu_session_options(bad)


def test_import_does_not_load_torch():
    code = "import sys; import edge_infer.devices; print('torch' in sys.modules, 'transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


SHARED_POOL_SCRIPT = """
import sys
import edge_infer
from edge_infer.devices import providers
from edge_infer.runtime.speculative import load_draft
target = edge_infer.load(sys.argv[1], device="cpu", threads=1, shared_threads=True)
draft = load_draft(target, sys.argv[1], device="cpu", threads=2)
later = edge_infer.load(sys.argv[1], device="cpu", threads=3)  # joins the pool: onnxruntime allows nothing else
sessions = [m.session.get_session_options() for m in (target, draft, later)]
assert [o.use_per_session_threads for o in sessions] == [False] * 3, sessions
assert providers._shared_pool_threads == 1
assert all(m.spinning.on and "thread pool" in m.describe_spinning() for m in (target, draft, later))
print(edge_infer.generate(later, [5, 6, 7], max_tokens=4) == edge_infer.generate(target, [5, 6, 7], max_tokens=4))
"""


def test_shared_thread_pool_for_a_target_and_its_draft(tiny_exports):
    """A fresh process: the target makes the pool, the draft and any later model run on it."""
    path = str(tiny_exports("llama", "fp32"))
    r = subprocess.run([sys.executable, "-c", SHARED_POOL_SCRIPT, path], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == "True"


OPENVINO = "OpenVINOExecutionProvider"
STANDARD = ModelTraits(contrib_ops=False, static_shapes=True)


@pytest.mark.parametrize("reported, best", [(["CPU", "GPU.0", "NPU"], "NPU"), (["CPU", "GPU.1"], "GPU"),
                                            (["CPU"], "CPU"), ([], "CPU")])
def test_bare_openvino_takes_the_best_device_present(reported, best):
    for request in ("openvino", "auto"):
        plan = resolve(request, [OPENVINO, CPU], STANDARD, openvino_devices=reported)
        assert plan.device == "openvino" and plan.provider_options[0] == {"device_type": best}
        assert f"openvino: device_type={best}, the best OpenVINO device here" in plan.reasons[-1]
    plan = resolve("openvino:GPU", [OPENVINO, CPU], STANDARD, openvino_devices=["CPU"])  # asked: kept as asked
    assert plan.provider_options[0] == {"device_type": "GPU"} and "best" not in " ".join(plan.reasons)


def test_native_stdout_goes_to_stderr_and_onnxruntime_log_lines_read_plainly():
    code = ("import os; from edge_infer.devices.native_output import stdout_to_stderr\n"
            "with stdout_to_stderr(): os.write(1, b'# LIBNATIVE: chatter\\n')\n"
            "print('answer')")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert run.stdout == "answer\n" and "# LIBNATIVE: chatter" in run.stderr
    from edge_infer.devices.native_output import log_message

    line = ("\x1b[1;31m2026-12-07 04:08:21.334770991 [E:onnxruntime:Default, provider_bridge_ort.cc:2310 Create] "
            "/onnxruntime/core/providers/openvino/openvino_provider_factory.cc:141 std::string ParseDeviceType("
            "std::shared_ptr<OVCore>) [ERROR] [OpenVINO] Device NPU is not available\x1b[m")
    assert log_message(line) == "[OpenVINO] Device NPU is not available"


def test_cpu_plan_always_starts_and_a_provider_without_kernels_is_not_called_unstarted():
    """The negative control of the start probe (tests/test_npu_providers.py has the positive one:
    an OpenVINO device that is not there): onnxruntime's Azure provider starts but runs no Add, so
    its failed probe is the nodes' problem, not a provider that did not start."""
    from edge_infer.devices.accelerators import did_not_start, provider_start_failure
    from edge_infer.devices.providers import DevicePlan

    assert did_not_start(resolve("cpu", [CPU], INT4)) is None
    if "AzureExecutionProvider" in available_providers():
        assert provider_start_failure(DevicePlan("azure", ("AzureExecutionProvider",), ({},), ())) is None
