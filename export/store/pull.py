"""`edge-infer pull hf:ORG/REPO[:FILE.gguf]`: fetch a model from the Hugging Face hub and export it
into the store in one step.

The network path is `huggingface_hub` (the `hub` extra) and nothing else: `hf_hub_download` for one
GGUF file, `snapshot_download` for a checkpoint folder, restricted to what export reads (config and
tokenizer JSON, safetensors, the chat template, a SentencePiece model; never pickles). Downloads land
in the hub's own cache (HF_HUB_CACHE, default ~/.cache/huggingface/hub) with its progress bars, so a
second pull, or one with HF_HUB_OFFLINE=1, reads the cache and touches no network. The export then
runs as `edge-infer export SRC --name NAME` does (export/export_folder.py, atomic, validated).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from edge_infer.contract.errors import UserError
from edge_infer.contract.model_store import DEFAULT_TAG, ModelName, folder_of, parse_name

PREFIX = "hf:"
FOLDER_FILES = ["*.json", "*.safetensors", "*.jinja", "tokenizer.model"]
_REPO = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*")


@dataclass(frozen=True)
class HubRef:
    repo: str  # ORG/REPO
    file: str | None  # a .gguf file in the repo, or None for the checkpoint folder

    def __str__(self) -> str:
        return PREFIX + self.repo + (f":{self.file}" if self.file else "")


def parse_ref(text: str) -> HubRef:
    if not text.startswith(PREFIX):
        raise UserError(f"{text!r}: pull takes hf:ORG/REPO (a checkpoint folder) or hf:ORG/REPO:FILE.gguf")
    repo, _, file = text[len(PREFIX):].partition(":")
    if not _REPO.fullmatch(repo) or ".." in repo:
        raise UserError(f"{text!r}: the repository must look like ORG/REPO (e.g. hf:HuggingFaceTB/SmolLM2-135M)")
    if file and (not file.lower().endswith(".gguf") or ".." in Path(file).parts or file.startswith("/")):
        raise UserError(f"{text!r}: the file after ':' must be a .gguf file of the repository")
    return HubRef(repo, file or None)


def _slug(text: str) -> str:
    s = re.sub(r"[^a-z0-9._-]+", "-", text.lower()).strip("-._")
    return s[:64].rstrip("-._") or "model"


def default_name(ref: HubRef) -> ModelName:
    """REPO (lower case) as the name; the GGUF file's stem as the tag, else `latest`."""
    tag = _slug(Path(ref.file).stem) if ref.file else DEFAULT_TAG
    return parse_name(f"{_slug(ref.repo.split('/')[1])}:{tag}")


def download(ref: HubRef, revision: str | None = None, quiet: bool = False) -> Path:
    """The local path of the GGUF file or checkpoint folder `ref` names (from the hub cache when there)."""
    try:
        import huggingface_hub
        from huggingface_hub import hf_hub_download, snapshot_download
    except ImportError:
        raise UserError("pull needs huggingface_hub: pip install 'edge-infer[hub]'") from None
    if quiet:
        huggingface_hub.utils.disable_progress_bars()
    try:
        if ref.file:
            return Path(hf_hub_download(ref.repo, ref.file, revision=revision))
        folder = Path(snapshot_download(ref.repo, revision=revision, allow_patterns=FOLDER_FILES))
    except (OSError, ValueError) as e:  # the hub's HTTP, offline and not-found errors are OSErrors
        raise UserError(f"{ref}: cannot fetch it ({type(e).__name__}: {e}). Offline (HF_HUB_OFFLINE=1), pull "
                        f"reads only the hub cache ({huggingface_hub.constants.HF_HUB_CACHE})") from None
    if not (folder / "config.json").is_file():
        raise UserError(f"{ref}: has no config.json; for a repository of GGUF files name one: {ref}:FILE.gguf")
    return folder


def pull(text: str, name: str | None, options, progress, revision: str | None = None) -> ModelName:
    """Download `text` (hf:...) and export it into the store as `name` (default: default_name)."""
    from edge_infer.export.export_folder import export_model

    ref = parse_ref(text)
    target = parse_name(name) if name is not None else default_name(ref)
    out = folder_of(target)
    if out.exists() and not options.force:  # before any download
        raise UserError(f"{target}: is already in the store; pass --force to replace it, or --name another name")
    progress.stage(f"fetching {ref}")
    src = download(ref, revision, quiet=progress.quiet)
    export_model(src, out, options, progress)
    return target
