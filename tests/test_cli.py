"""The command line through click's CliRunner: outputs, exit codes, one-line errors."""

import json

import pytest
from click.testing import CliRunner

from edge_infer.cli import main


@pytest.fixture
def cli():
    runner = CliRunner()

    def invoke(*args, input=None):
        return runner.invoke(main, [str(a) for a in args], input=input, catch_exceptions=False)

    return invoke


def assert_user_error(result, text):
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert any(text in line for line in lines), result.output
    assert "Traceback" not in result.output


def test_every_command_has_help(cli):
    for cmd in ("export", "quantize", "run", "chat", "devices", "inspect", "bench", "eval", "serve"):
        result = cli(cmd, "--help")
        assert result.exit_code == 0 and "Usage:" in result.output, cmd


def test_run_streams_text(cli, tiny_exports):
    result = cli("run", tiny_exports("llama", "int4"), "hello", "--max-tokens", "5", "--no-stats")
    assert result.exit_code == 0, result.output


def test_run_reports_device_and_timings(cli, tiny_exports):
    import edge_infer

    result = cli("run", tiny_exports("qwen2", "fp32"), "hello", "--max-tokens", "3")
    assert result.exit_code == 0
    # what --device auto picks here: cpu (CPUExecutionProvider) on a CPU-only onnxruntime build
    assert f"device {edge_infer.load(tiny_exports('qwen2', 'fp32')).describe_device()}" in result.output
    assert "prompt tokens" in result.output and "decode" in result.output


@pytest.mark.parametrize("args, text", [
    (["run", "/nonexistent/model", "hi"], "no such model folder"),
    (["run", "{model}", "hi", "--temperature", "-1"], "temperature must be a finite number >= 0"),
    (["run", "{model}", "hi", "--top-p", "0"], "top_p must be a finite number in (0, 1]"),
    (["run", "{model}", "hi", "--device", "tpu"], "unknown device 'tpu'"),
    (["run", "{model}", "hi", "--device", "{missing}"], "available here"),  # a known device this build lacks
    (["run", "{model}", "hi", "--max-tokens", "1000"], "exceeds the context of 128"),
    (["export", "/nonexistent/ckpt", "-o", "{tmp}/out"], "no such file or folder"),
    (["inspect", "/nonexistent/model"], "no such model folder"),
])
def test_bad_input_exits_2_with_one_line(cli, tiny_exports, tmp_path, args, text):
    from edge_infer.devices import PROVIDERS, available_providers

    model = tiny_exports("llama", "fp32")
    missing = next(p.name for p in PROVIDERS if p.ort_name not in available_providers())
    args = [a.format(model=model, tmp=tmp_path, missing=missing) for a in args]
    assert_user_error(cli(*args), text)


def test_unknown_option_is_a_usage_error(cli):
    result = cli("run", "--no-such-option")
    assert result.exit_code == 2 and "No such option" in result.output


def test_export_quantize_inspect(cli, tiny_checkpoints, tmp_path):
    fp32 = tmp_path / "fp32"
    result = cli("export", tiny_checkpoints("phi3"), "-o", fp32, "--quant", "fp32", "--max-length", "64", "-q")
    assert result.exit_code == 0, result.output
    q4 = tmp_path / "q4"
    result = cli("quantize", fp32, "-o", q4, "--quant", "int4", "--block-size", "16", "--symmetric", "-q")
    assert result.exit_code == 0, result.output
    result = cli("inspect", q4)
    assert result.exit_code == 0
    assert "int4 (block 16, sym" in result.output and "all sha256 verified" in result.output
    manifest = json.loads(cli("inspect", q4, "--json").output)
    assert manifest["quantization"]["from"] == "fp32" and manifest["validation"]["positions"] > 0
    assert_user_error(cli("quantize", q4, "-o", tmp_path / "again"), "already quantized")


def test_export_progress_and_quiet(cli, tiny_checkpoints, tmp_path):
    loud = cli("export", tiny_checkpoints("llama"), "-o", tmp_path / "a", "--quant", "int8", "--max-length", "64")
    assert "quantizing to int8" in loud.output and "KV cache" in loud.output and "top-1 agreement" in loud.output
    quiet = cli("export", tiny_checkpoints("llama"), "-o", tmp_path / "b", "--quant", "int8", "--max-length", "64", "-q")
    assert quiet.output == ""


def test_devices_lists_cpu_and_explains_auto(cli):
    from edge_infer.devices import ModelTraits, available_providers, resolve

    result = cli("devices")
    assert result.exit_code == 0
    assert "CPUExecutionProvider" in result.output
    # auto's walk as this onnxruntime build reports its providers ("cuda: skipped, ..." without a GPU)
    plan = resolve("auto", available_providers(), ModelTraits(dtype="fp32", contrib_ops=True))
    assert plan.reasons and all(f"  {reason}\n" in result.output for reason in plan.reasons)
    if "CUDAExecutionProvider" not in available_providers():
        assert "cuda: skipped" in result.output


def test_chat_repl(cli, tiny_exports):
    result = cli("chat", tiny_exports("llama", "fp32"), "--max-tokens", "4", input="hello\nagain\n/exit\n")
    assert result.exit_code == 0, result.output
    assert result.output.count(">>> ") == 3
