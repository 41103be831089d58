"""The speculative options of the command line: `run` (lookup in-process; a draft in its own
process, since it puts the process on onnxruntime's shared thread pool for good) and the checks
every command makes before it loads anything."""

import subprocess
import sys

import pytest
from click.testing import CliRunner

from edge_infer.cli import main


@pytest.fixture(scope="module")
def paths(tiny_exports):
    return str(tiny_exports("llama", "fp32")), str(tiny_exports("llama", "int4"))


ARGS = ["ab ab ab ab ab", "--raw", "--max-tokens", "12"]


def test_run_lookup_prints_what_plain_decoding_prints(paths):
    target, _ = paths
    runner = CliRunner()
    plain = runner.invoke(main, ["run", target, *ARGS, "--no-stats"])
    assert plain.exit_code == 0, plain.output
    got = runner.invoke(main, ["run", target, *ARGS, "--speculative", "lookup"])
    assert got.exit_code == 0, got.output
    assert got.stdout == plain.stdout and "accepted" in got.stderr


def test_run_with_a_draft_model(paths):
    target, draft = paths
    cli = [sys.executable, "-m", "edge_infer.cli", "run", target, *ARGS]
    plain = subprocess.run(cli + ["--no-stats"], capture_output=True, text=True, timeout=300)
    got = subprocess.run(cli + ["--speculative", "draft", "--draft", draft, "--num-speculative", "3"],
                         capture_output=True, text=True, timeout=300)
    assert plain.returncode == 0 and got.returncode == 0, got.stderr[-2000:]
    assert got.stdout == plain.stdout and "accepted" in got.stderr


@pytest.mark.parametrize("command", [["run", "{m}", "hi"], ["chat", "{m}"], ["bench", "{m}", "--new-tokens", "4"],
                                     ["serve", "{m}", "--port", "0"]])
def test_bad_combinations_are_refused_before_loading(paths, command, monkeypatch):
    import edge_infer
    from edge_infer.runtime import model

    def no_loading(*a, **k):
        raise AssertionError("the model was loaded before the options were checked")

    monkeypatch.setattr(edge_infer, "load", no_loading)
    monkeypatch.setattr(model, "load", no_loading)  # what the commands call
    target, _ = paths
    argv = [c.format(m=target) for c in command]
    bad = CliRunner().invoke(main, argv + ["--speculative", "draft"])
    assert bad.exit_code == 2 and "needs a draft model" in bad.output
    bad = CliRunner().invoke(main, argv + ["--speculative", "lookup", "--draft", target])
    assert bad.exit_code == 2 and "only used with --speculative draft" in bad.output
