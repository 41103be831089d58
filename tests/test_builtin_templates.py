"""Chat templates for every file (runtime/template_library.py): the built-in templates render their
families' published formats; a GGUF without `tokenizer.chat_template` chats through its family's
template when the architecture names one (export says so), else export warns it takes raw text;
`--chat-template NAME|FILE` at export is stored in the folder and the manifest, and at run/serve
overrides the folder's template."""

from __future__ import annotations

import io
import json

import pytest
from click.testing import CliRunner
from gguf_convert import write_gguf
from tiny import load_reference, make_checkpoint

import edge_infer
from edge_infer.cli import main
from edge_infer.export.export_folder import ExportOptions, export_model
from edge_infer.export.progress import Progress
from edge_infer.runtime.chat_template import ChatTemplate
from edge_infer.runtime.generate import generate
from edge_infer.runtime.template_library import BUILTIN, for_architecture

CONVERSATION = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Why?"}]
# Each family's published prompt format, written out by hand for CONVERSATION (B = bos, E = eos).
EXPECTED = {
    "chatml": "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
              "Hello.<|im_end|>\n<|im_start|>user\nWhy?<|im_end|>\n<|im_start|>assistant\n",
    "llama2": "B[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi [/INST] Hello. EB[INST] Why? [/INST]",
    "llama3": "B<|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|><|start_header_id|>user"
              "<|end_header_id|>\n\nHi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\nHello.<|eot_id|>"
              "<|start_header_id|>user<|end_header_id|>\n\nWhy?<|eot_id|><|start_header_id|>assistant"
              "<|end_header_id|>\n\n",
    "mistral": "B[INST] Be brief.\n\nHi[/INST] Hello.E[INST] Why?[/INST]",
    "gemma": "B<start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\nHello.<end_of_turn>\n"
             "<start_of_turn>user\nWhy?<end_of_turn>\n<start_of_turn>model\n",
    "phi3": "<|system|>\nBe brief.<|end|>\n<|user|>\nHi<|end|>\n<|assistant|>\nHello.<|end|>\n<|user|>\nWhy?<|end|>\n"
            "<|assistant|>\n",
    "zephyr": "<|system|>\nBe brief.E\n<|user|>\nHiE\n<|assistant|>\nHello.E\n<|user|>\nWhy?E\n<|assistant|>\n",
}


@pytest.mark.parametrize("name", list(BUILTIN))
def test_builtin_template_renders_the_published_format(name):
    assert set(EXPECTED) == set(BUILTIN)
    assert ChatTemplate(BUILTIN[name], bos_token="B", eos_token="E").render(CONVERSATION) == EXPECTED[name]


def test_family_detection_is_unambiguous_or_nothing():
    none = lambda t: False  # noqa: E731
    assert for_architecture("gemma3_text", none) == "gemma" and for_architecture("qwen3", none) == "chatml"
    assert for_architecture("llama", none) is None  # Llama 2, Llama 3, Mistral, SmolLM share it
    assert for_architecture("llama", lambda t: t in ("<|start_header_id|>", "<|eot_id|>")) == "llama3"
    assert for_architecture("gpt2", lambda t: True) is None


def export_gguf(kind: str, tmp_path, **over):
    ref = load_reference(make_checkpoint(kind, tmp_path / "hf", **over))
    path = write_gguf(kind, ref, tmp_path / f"{kind}.gguf", chat_template=None)
    log = io.StringIO()
    out = export_model(path, tmp_path / "out", ExportOptions(quant="fp32", max_length=64, validate=False),
                       Progress(stream=log))
    return out, log.getvalue()


def test_gguf_without_a_template_chats_through_its_family_template(tmp_path):
    out, log = export_gguf("gemma3_text", tmp_path, num_hidden_layers=2)
    assert "no tokenizer.chat_template; using the built-in 'gemma' template" in log
    tok = json.loads((out / "manifest.json").read_text())["tokenizer"]
    assert tok["chat_template_origin"] == "built-in gemma" and tok["chat_template_file"]
    model = edge_infer.load(out, device="cpu", threads=1)
    messages = CONVERSATION[:2]
    prompt = f"{tok['bos_token']}<start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\n"
    assert model.chat_template.render(messages) == prompt
    ids = model.tokenizer.encode(prompt, add_special_tokens=False)
    assert generate(model, messages, max_tokens=6) == generate(model, ids, max_tokens=6)


def test_gguf_of_no_single_family_warns_it_takes_raw_text(tmp_path):
    out, log = export_gguf("gpt2", tmp_path)
    assert "warning: the GGUF file has no tokenizer.chat_template" in log and "raw text" in log
    assert json.loads((out / "manifest.json").read_text())["tokenizer"]["chat_template_file"] is None
    r = CliRunner().invoke(main, ["run", str(out), "Hi", "--max-tokens", "2", "--device", "cpu"])
    assert r.exit_code == 0 and "no chat template: PROMPT goes in as raw text" in r.stderr


def test_chat_template_option_at_export_and_at_run(tiny_checkpoints, tmp_path):
    out = tmp_path / "m"
    r = CliRunner().invoke(main, ["export", str(tiny_checkpoints("llama")), "-o", str(out), "--quant", "fp32",
                                  "--max-length", "64", "--no-validate", "--chat-template", "llama3"])
    assert r.exit_code == 0, r.output
    assert "chat template: built-in llama3 (--chat-template)" in r.stderr
    tok = json.loads((out / "manifest.json").read_text())["tokenizer"]
    assert tok["chat_template_origin"] == "built-in llama3"
    assert (out / tok["chat_template_file"]).read_text() == BUILTIN["llama3"]
    assert "template    built-in llama3" in CliRunner().invoke(main, ["inspect", str(out)]).stdout

    custom = tmp_path / "qa.jinja"
    custom.write_text("{{ 'Q: ' ~ messages[-1]['content'] ~ '\\nA:' }}")
    r = CliRunner().invoke(main, ["run", str(out), "Paris is", "--max-tokens", "5", "--device", "cpu",
                                  "--no-stats", "--chat-template", str(custom)])
    assert r.exit_code == 0, r.output
    model = edge_infer.load(out, device="cpu", threads=1)
    raw = model.tokenizer.encode("Q: Paris is\nA:", add_special_tokens=False)
    assert r.stdout == generate(model, raw, max_tokens=5) + "\n"
    overridden = edge_infer.load(out, device="cpu", threads=1, chat_template="chatml")
    assert overridden.chat_template.render(CONVERSATION[1:2]) == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"

    r = CliRunner().invoke(main, ["run", str(out), "Hi", "--chat-template", "no-such-template"])
    assert r.exit_code == 2 and "neither a built-in template (chatml, llama2" in r.stderr
