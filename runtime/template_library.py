"""Built-in chat templates for the common model families, and how a model gets one.

A model file that ships no chat template (many GGUF files: `tokenizer.chat_template` is optional)
would otherwise take raw text. `--chat-template NAME|FILE` gives it one, at export (stored in the
folder, the manifest says where it came from) or at run/serve (an override for that process).
When the file has none, export picks the family's template if the architecture names exactly one
family (`for_architecture`), and says so.

The templates are written here from the families' published prompt formats, in the same Jinja
dialect as a model's own template (rendered by runtime/chat_template.py, sandboxed): variables
`messages`, `add_generation_prompt`, `bos_token`, `eos_token`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from edge_infer.contract.errors import UserError

# A leading system message, split off for the formats that fold it into the first user turn.
_SPLIT_SYSTEM = (
    "{% if messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] | trim %}"
    "{% set loop_messages = messages[1:] %}{% else %}{% set system = '' %}{% set loop_messages = messages %}"
    "{% endif %}"
)

BUILTIN: dict[str, str] = {
    # <|im_start|>role\ncontent<|im_end|>\n (Qwen, SmolLM, Hermes, Yi, ...)
    "chatml": (
        "{% for message in messages %}{{ '<|im_start|>' ~ message['role'] ~ '\\n' ~ (message['content'] or '') ~ "
        "'<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    ),
    # <s>[INST] <<SYS>>\nsystem\n<</SYS>>\n\nuser [/INST] answer </s>
    "llama2": _SPLIT_SYSTEM + (
        "{% for message in loop_messages %}{% if message['role'] == 'user' %}"
        "{% if loop.first and system %}{{ bos_token ~ '[INST] <<SYS>>\\n' ~ system ~ '\\n<</SYS>>\\n\\n' ~ "
        "message['content'] | trim ~ ' [/INST]' }}{% else %}{{ bos_token ~ '[INST] ' ~ message['content'] | trim ~ "
        "' [/INST]' }}{% endif %}{% elif message['role'] == 'assistant' %}"
        "{{ ' ' ~ (message['content'] or '') | trim ~ ' ' ~ eos_token }}{% endif %}{% endfor %}"
    ),
    # <|begin_of_text|><|start_header_id|>role<|end_header_id|>\n\ncontent<|eot_id|>
    "llama3": (
        "{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' ~ message['role'] ~ "
        "'<|end_header_id|>\\n\\n' ~ (message['content'] or '') | trim ~ '<|eot_id|>' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
    ),
    # <s>[INST] system\n\nuser[/INST] answer</s>
    "mistral": _SPLIT_SYSTEM + (
        "{{ bos_token }}{% for message in loop_messages %}{% if message['role'] == 'user' %}"
        "{{ '[INST] ' ~ (system ~ '\\n\\n' if loop.first and system else '') ~ message['content'] | trim ~ "
        "'[/INST]' }}{% elif message['role'] == 'assistant' %}{{ ' ' ~ (message['content'] or '') | trim ~ "
        "eos_token }}{% endif %}{% endfor %}"
    ),
    # <bos><start_of_turn>user\ncontent<end_of_turn>\n<start_of_turn>model\n (no system role: it opens
    # the first user turn)
    "gemma": _SPLIT_SYSTEM + (
        "{{ bos_token }}{% for message in loop_messages %}"
        "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
        "{{ '<start_of_turn>' ~ role ~ '\\n' ~ (system ~ '\\n\\n' if loop.first and system else '') ~ "
        "(message['content'] or '') | trim ~ '<end_of_turn>\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}"
    ),
    # <|system|>\ncontent<|end|>\n<|user|>\ncontent<|end|>\n<|assistant|>\n
    "phi3": (
        "{% for message in messages %}{{ '<|' ~ message['role'] ~ '|>\\n' ~ (message['content'] or '') ~ "
        "'<|end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
    ),
    # <|user|>\ncontent</s>\n<|assistant|>\n
    "zephyr": (
        "{% for message in messages %}{{ '<|' ~ message['role'] ~ '|>\\n' ~ (message['content'] or '') ~ "
        "eos_token ~ '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
    ),
}

# Special tokens a tokenizer has when it was trained for the format (to choose among candidates).
_MARKERS = {"chatml": ("<|im_start|>", "<|im_end|>"), "llama3": ("<|start_header_id|>", "<|eot_id|>"),
            "gemma": ("<start_of_turn>", "<end_of_turn>"), "phi3": ("<|user|>", "<|end|>")}

# model_type (a GGUF's general.architecture as export maps it) -> the formats its models use. One
# candidate: that family's format. Several (llama-architecture files are Llama 2, Llama 3, Mistral,
# SmolLM, ... alike): the one whose special tokens the tokenizer has, when exactly one has them.
FAMILIES: dict[str, tuple[str, ...]] = {
    "gemma": ("gemma",), "gemma2": ("gemma",), "gemma3": ("gemma",), "gemma3_text": ("gemma",),
    "qwen2": ("chatml",), "qwen2_moe": ("chatml",), "qwen3": ("chatml",), "qwen3_moe": ("chatml",),
    "phi3": ("phi3",), "mistral": ("mistral",),
    "llama": ("llama3", "chatml"),
}

MAX_TEMPLATE_BYTES = 1_000_000


@dataclass(frozen=True)
class TemplateChoice:
    source: str  # the Jinja text
    origin: str  # what the manifest and messages call it: "built-in gemma" or "file NAME"


def resolve(spec: str) -> TemplateChoice:
    """`--chat-template NAME|FILE`: a built-in template by name, or a Jinja file."""
    if spec in BUILTIN:
        return TemplateChoice(BUILTIN[spec], f"built-in {spec}")
    path = Path(spec)
    if not path.is_file():
        raise UserError(f"--chat-template {spec!r} is neither a built-in template ({', '.join(BUILTIN)}) "
                        "nor a file; give one of those names or the path of a Jinja template")
    if path.stat().st_size > MAX_TEMPLATE_BYTES:
        raise UserError(f"--chat-template {spec}: the file is larger than {MAX_TEMPLATE_BYTES} bytes; "
                        "a chat template is a few kilobytes")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"--chat-template {spec}: cannot read it as UTF-8 text ({e})") from None
    return TemplateChoice(text, f"file {path.name}")


def for_architecture(model_type: str | None, has_token) -> str | None:
    """The built-in template's name for a model of `model_type` with no template of its own, or
    None when the architecture does not identify one format. `has_token(text)` says whether the
    tokenizer has a token (used only to choose among several candidates)."""
    candidates = FAMILIES.get(model_type or "", ())
    if len(candidates) > 1:
        candidates = tuple(c for c in candidates if all(has_token(t) for t in _MARKERS.get(c, ())))
    return candidates[0] if len(candidates) == 1 else None


def override(model, spec: str) -> None:
    """Give a loaded model the chat template `spec` names (NAME|FILE) in place of its own."""
    use_template(model, resolve(spec))


def use_template(model, choice: TemplateChoice) -> None:
    """Give a loaded model the chat template `choice` (already read: a Ray replica gets the text its
    driver read, the file need not exist on the replica's machine)."""
    from edge_infer.runtime.chat_template import ChatTemplate

    tok = model.manifest.tokenizer
    model.chat_template = ChatTemplate(choice.source, bos_token=tok.bos_token or "", eos_token=tok.eos_token or "")
    model.chat_template_origin = choice.origin
