"""All-position logits from onnxruntime-genai's model folder, for `benchmarks/quality.py`.

genai's graph follows the optimum/genai I/O contract: input_ids, attention_mask and
past_key_values.{i}.key/value in, logits for every position and present.{i}.* out. One
fresh pass with an empty past (past_sequence_length 0) scores a window, exactly like
edge-infer's `measure.edge_logits` does on its own graph. Runs in this repo's .venv
(plain onnxruntime); the genai runtime itself is not needed to read the graph.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort


def genai_logits(folder: str | Path, threads: int = 2):
    """A `measure.Logits` callable over genai's decoder: ids (seq,) -> logits (seq, vocab)."""
    folder = Path(folder)
    cfg = json.loads((folder / "genai_config.json").read_text())["model"]
    dec = cfg["decoder"]
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    session = ort.InferenceSession(str(folder / dec["filename"]), options, providers=["CPUExecutionProvider"])
    names = {i.name for i in session.get_inputs()}
    layers, kv_heads, head = dec["num_hidden_layers"], dec["num_key_value_heads"], dec["head_size"]
    past_names = [dec["inputs"][k] % i for i in range(layers) for k in ("past_key_names", "past_value_names")]
    empty = np.zeros((1, kv_heads, 0, head), dtype=np.float32)  # (batch, kv_heads, past_sequence_length, head_dim)

    def fn(ids: np.ndarray) -> np.ndarray:
        feeds = {"input_ids": ids[None, :].astype(np.int64),
                 "attention_mask": np.ones((1, len(ids)), dtype=np.int64)}
        if "position_ids" in names:
            feeds["position_ids"] = np.arange(len(ids), dtype=np.int64)[None, :]
        feeds.update({n: empty for n in past_names})
        return session.run(["logits"], feeds)[0][0]  # (seq, vocab)

    return fn
