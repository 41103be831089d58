"""The model store: one directory holding model folders by name, and how a name becomes a folder.

    $EDGE_INFER_HOME/models/NAME/TAG/      a model folder (manifest.json and the files it lists)

EDGE_INFER_HOME defaults to the platform's user data directory: $XDG_DATA_HOME/edge-infer
(~/.local/share/edge-infer) on Linux, %LOCALAPPDATA%\\edge-infer on Windows, ~/Library/Application
Support/edge-infer on macOS. A name is `NAME` or `NAME:TAG` (the tag defaults to `latest`); both
parts are lower case letters, digits, `.`, `_` and `-`, start with a letter or digit, and are at most
64 characters, so they are safe folder names on every filesystem (no separators, no `..`, no
Windows device names, and no two names that differ only in case).

Every command that takes a model folder also takes a name (`resolve_model`): a path that exists
wins, so `./smol` in the current directory is used even when the store holds a `smol` too; give
a path that does not exist and is not a stored name, and the error lists the closest stored names.
Only paths here (no manifest parsing): runtime/manifest.py calls `resolve_model`, store/ does the rest.
"""

from __future__ import annotations

import difflib
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from edge_infer.contract.errors import ModelFileError, UserError

HOME_ENV = "EDGE_INFER_HOME"
DEFAULT_TAG = "latest"
MODELS = "models"
_PART = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
_WINDOWS_DEVICES = {"con", "prn", "aux", "nul", *(f"com{i}" for i in range(10)), *(f"lpt{i}" for i in range(10))}


@dataclass(frozen=True, order=True)
class ModelName:
    name: str
    tag: str = DEFAULT_TAG

    def __str__(self) -> str:
        return f"{self.name}:{self.tag}"


def store_home() -> Path:
    """EDGE_INFER_HOME, or the platform's user data directory + edge-infer."""
    if os.environ.get(HOME_ENV):
        return Path(os.environ[HOME_ENV]).expanduser()
    if sys.platform == "win32":
        base = Path(os.environ.get("LOCALAPPDATA") or Path.home() / "AppData" / "Local")
    elif sys.platform == "darwin":
        base = Path.home() / "Library" / "Application Support"
    else:
        base = Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share")
    return base / "edge-infer"


def models_root() -> Path:
    return store_home() / MODELS


def _check_part(part: str, what: str, text: str) -> str:
    if not _PART.fullmatch(part) or part.rstrip(".") != part or part.split(".")[0] in _WINDOWS_DEVICES:
        raise UserError(f"{text!r} is not a valid model name: the {what} must be 1-64 lower case letters, digits, "
                        "'.', '_' or '-', start with a letter or digit, and not end with '.' (e.g. smollm2:q4)")
    return part


def parse_name(text: str) -> ModelName:
    """`NAME` or `NAME:TAG` as a ModelName; a UserError saying the rule for anything else."""
    name, colon, tag = str(text).partition(":")
    return ModelName(_check_part(name, "name", text), _check_part(tag, "tag", text) if colon else DEFAULT_TAG)


def is_name(text: str) -> bool:
    try:
        parse_name(text)
    except UserError:
        return False
    return True


def folder_of(name: ModelName | str) -> Path:
    """Where the store keeps `name` (whether or not it is there)."""
    n = parse_name(name) if isinstance(name, str) else name
    return models_root() / n.name / n.tag


def stored_names() -> list[ModelName]:
    """Every model in the store (a finished folder: its manifest written), sorted."""
    root = models_root()
    if not root.is_dir():
        return []
    found = []
    for tag_dir in root.glob("*/*"):
        name, tag = tag_dir.parent.name, tag_dir.name
        if is_name(f"{name}:{tag}") and (tag_dir / "manifest.json").is_file():
            found.append(ModelName(name, tag))
    return sorted(found)


def close_names(text: str, limit: int = 5) -> list[str]:
    """Stored names that look like `text` (difflib), best first."""
    names = [str(n) for n in stored_names()]
    bare = {n.split(":")[0] for n in names}
    matches = difflib.get_close_matches(str(text).lower(), names + sorted(bare), n=limit * 2, cutoff=0.5)
    out = []
    for m in matches:  # a bare name stands for its tags: show the full names
        for full in ([m] if ":" in m else [n for n in names if n.split(":")[0] == m]):
            if full not in out:
                out.append(full)
    return out[:limit]


def not_stored(text: str) -> ModelFileError:
    """The error for a name the store does not hold, listing close names."""
    close = close_names(text)
    hint = (f"; did you mean {', '.join(close)}?" if close
            else "; `edge-infer list` shows the stored models, `edge-infer export SRC --name NAME` adds one")
    return ModelFileError(f"{text}: no such model folder, and no model '{parse_name(text)}' in the store "
                          f"({models_root()}){hint}")


def resolve_model(ref: str | os.PathLike) -> Path:
    """The folder `ref` means: the path itself when it exists, else the stored model of that name.

    A path that exists always wins (a folder `smol` in the current directory over the store's
    `smol`). A missing path that is not a valid name comes back unchanged, for the caller's own
    "no such folder" error."""
    path = Path(ref)
    if path.exists() or not is_name(str(ref)):
        return path
    folder = folder_of(str(ref))
    if folder.is_dir():
        return folder
    raise not_stored(str(ref))
