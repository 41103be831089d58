"""How a Hugging Face folder pools and normalizes its embeddings, read from its sentence-transformers files.

    modules.json                        the pipeline: Transformer, Pooling (path), Normalize (present or not)
    1_Pooling/config.json               pooling_mode_cls_token / _mean_tokens / _max_tokens / _lasttoken
    config_sentence_transformers.json   named prompts ("query": "Instruct: ...\\nQuery:")
    sentence_bert_config.json           max_seq_length
A folder without these (a bare transformers checkpoint) gets the family's default: mean pooling
for encoders, last-token for decoders, normalized either way. A module we cannot run (Dense,
a custom one) is refused by name rather than silently left out.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from edge_infer.contract.embedding import EmbeddingRecord
from edge_infer.contract.errors import ModelFileError

_MODES = {"pooling_mode_cls_token": "cls", "pooling_mode_mean_tokens": "mean", "pooling_mode_max_tokens": "max",
          "pooling_mode_lasttoken": "last_token"}
_UNSUPPORTED_MODES = ("pooling_mode_mean_sqrt_len_tokens", "pooling_mode_weightedmean_tokens")
_KNOWN_MODULES = ("Transformer", "Pooling", "Normalize")
# Where a source says a prefix of its vector is an embedding too (Matryoshka training).
MATRYOSHKA_KEYS = ("matryoshka_dimensions", "matryoshka_dims")


def _json(path: Path) -> Any:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelFileError(f"{path}: not valid JSON ({e})") from None


def embedding_record(folder: Path, config: dict, hidden: int, context: int, kind: str,
                     matryoshka: bool | None = None) -> EmbeddingRecord:
    """The pooling record for the source `folder` (`kind` "encoder" or "decoder")."""
    pooling, normalize = ("mean" if kind == "encoder" else "last_token"), True
    modules = _json(folder / "modules.json")
    if isinstance(modules, list):
        pooling, normalize = _from_modules(folder, modules, pooling)
    st = _json(folder / "config_sentence_transformers.json") or {}
    prompts: dict = st["prompts"] if isinstance(st.get("prompts"), dict) else {}
    bert = _json(folder / "sentence_bert_config.json") or {}
    max_tokens = int(bert.get("max_seq_length") or context)
    if matryoshka is None:
        matryoshka = any(config.get(k) or st.get(k) for k in MATRYOSHKA_KEYS)
    return EmbeddingRecord(pooling=pooling, normalize=normalize, dimensions=hidden, matryoshka=bool(matryoshka),
                           max_tokens=min(max_tokens, context), kind=kind,
                           prompts=tuple((str(k), str(v)) for k, v in prompts.items()))


def _from_modules(folder: Path, modules: list, default: str) -> tuple[str, bool]:
    pooling, normalize = default, False
    for m in modules:
        kind = str(m.get("type", "")).rsplit(".", 1)[-1] if isinstance(m, dict) else ""
        if kind not in _KNOWN_MODULES:
            raise ModelFileError(f"{folder / 'modules.json'}: module {kind or m!r} is not supported (edge-infer runs "
                                 f"{', '.join(_KNOWN_MODULES)}); export a model without it")
        if kind == "Normalize":
            normalize = True
        if kind == "Pooling":
            pooling = _pooling_mode(folder / str(m.get("path", "1_Pooling")) / "config.json")
    return pooling, normalize


def _pooling_mode(path: Path) -> str:
    cfg = _json(path)
    if not isinstance(cfg, dict):
        raise ModelFileError(f"{path}: missing; modules.json names a Pooling module there")
    for key in _UNSUPPORTED_MODES:
        if cfg.get(key):
            raise ModelFileError(f"{path}: {key} is not supported (supported: {', '.join(_MODES)})")
    on = [mode for key, mode in _MODES.items() if cfg.get(key)]
    if len(on) != 1:
        raise ModelFileError(f"{path}: expected exactly one pooling mode switched on, found {on or 'none'}")
    return on[0]
