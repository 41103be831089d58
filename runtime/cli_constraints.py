"""The `run` command's structured-output options (--json-schema, --json, --regex, --grammar), turned into
stream_generate keywords."""

from __future__ import annotations

from pathlib import Path

from edge_infer.contract.errors import UserError


def _read(path: str, what: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: cannot read the {what} ({e})") from None


def constraint_options(json_schema: str | None, json_object: bool, regex: str | None, lark: str | None) -> dict:
    """At most one of --json-schema FILE, --json, --regex RE, --grammar FILE.lark; {} when none.

    The grammar is checked here, before the model loads (and again against its tokenizer)."""
    from edge_infer.runtime.constrain import constraint_from

    options = _options(json_schema, json_object, regex, lark)
    constraint_from(**options)
    return options


def _options(json_schema: str | None, json_object: bool, regex: str | None, lark: str | None) -> dict:
    given = [name for name, v in (("--json-schema", json_schema), ("--json", json_object), ("--regex", regex),
                                  ("--grammar", lark)) if v]
    if len(given) > 1:
        raise UserError(f"{' and '.join(given)} cannot be combined; pick one")
    if json_schema:
        import json

        text = _read(json_schema, "JSON schema")
        try:
            schema = json.loads(text)
        except ValueError as e:
            raise UserError(f"{json_schema}: not valid JSON ({e})") from None
        return {"response_format": {"type": "json_schema", "json_schema": {"name": Path(json_schema).stem,
                                                                           "schema": schema}}}
    if json_object:
        return {"response_format": {"type": "json_object"}}
    if regex:
        return {"grammar": {"type": "regex", "regex": regex}}
    if lark:
        return {"grammar": {"type": "lark", "lark": _read(lark, "Lark grammar")}}
    return {}
