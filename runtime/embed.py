"""Embeddings: a model folder exported for embedding, texts in, one float32 vector per text out.

    import edge_infer
    vectors = edge_infer.embed("bge-small-int8", ["first text", "second text"])  # (2, 384) float32

The graph gives the final hidden state of every token (contract/io_names.py LAST_HIDDEN_STATE);
this module pools it over each text's real tokens (mean, CLS, last token or max, as the
manifest's embedding record says), truncates it when a Matryoshka model is asked for fewer
dimensions, and L2-normalizes it. Texts are batched by length (right padding, masked), so a
text's vector does not depend on what it was batched with, up to float rounding.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from edge_infer.contract.embedding import TASK_EMBED, EmbeddingRecord
from edge_infer.contract.errors import ContextLengthError, ModelFileError, UserError
from edge_infer.contract.io_names import (ATTENTION_MASK, INPUT_IDS, LAST_HIDDEN_STATE, PAST_PREFIX, POSITION_IDS,
                                          QUERY_SEQLENS, TOKEN_TYPE_IDS)
from edge_infer.runtime.manifest import Manifest, load_manifest
from edge_infer.runtime.tokenizer import Tokenizer

BATCH_ROWS = 32  # texts per pass
BATCH_TOKENS = 16384  # rows x padded length per pass: bounds the attention scores' memory


@dataclass(frozen=True)
class Embeddings:
    vectors: np.ndarray  # (texts, dimensions) float32
    token_counts: tuple[int, ...]  # tokens of each text, special tokens included

    @property
    def prompt_tokens(self) -> int:
        return sum(self.token_counts)


class EmbeddingModel:
    """A loaded embedding folder: its record, tokenizer and onnxruntime session."""

    def __init__(self, manifest: Manifest, threads: int | None = None, device: str = "auto"):
        from edge_infer.devices import ModelTraits, available_providers, resolve
        from edge_infer.devices.ort import ort
        from edge_infer.devices.providers import cpu_session_options
        from edge_infer.runtime import mapped_weights
        from edge_infer.runtime.model import check_external_data, external_files

        assert manifest.embedding is not None, "an embedding folder (manifest task embed)"
        self.manifest, self.folder, self.raw = manifest, manifest.folder, manifest.raw
        self.name = manifest.folder.name
        self.record = manifest.embedding
        g = manifest.geometry
        self.vocab_size, self.num_layers = g.vocab_size, g.num_layers
        self.kv_shape = (g.num_kv_heads, g.head_dim)
        self.dtype = np.float16 if manifest.dtype == "fp16" else np.float32
        spec = manifest.tokenizer
        self.tokenizer = Tokenizer(self.folder / spec.file, spec)
        self.pad_id = spec.pad_token_id if spec.pad_token_id is not None else 0
        graph = self.folder / manifest.graph_file
        proto = check_external_data(graph)  # no tensor read from outside the folder
        bits = manifest.quantization.bits
        traits = ModelTraits(dtype=manifest.dtype, contrib_ops=self.record.kind == "decoder" or bool(bits),
                             quant_bits=bits)
        self.plan = resolve(device, available_providers(), traits)  # an explicit device that cannot run it: says why
        self.session = ort.InferenceSession(str(graph), cpu_session_options(threads),
                                            providers=self.plan.session_providers())
        if self.session.get_providers()[0] != self.plan.providers[0]:
            raise UserError(f"requested {self.plan.providers[0]} but onnxruntime runs {self.session.get_providers()[0]}")
        self.inputs = {i.name for i in self.session.get_inputs()}
        mapped_weights.release(external_files(graph, proto))  # pages only the packing read (runtime/mapped_weights.py)

    @property
    def dimensions(self) -> int:
        return self.record.dimensions

    @property
    def max_tokens(self) -> int:
        return self.record.max_tokens

    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        return [self.tokenizer.encode(text) for text in texts]

    def embed(self, texts: Sequence[str], dimensions: int | None = None, prompt_name: str | None = None) -> np.ndarray:
        """(len(texts), dimensions) float32. `prompt_name`: one of the source's sentence-transformers prompts
        (Qwen3-Embedding's "query", e5's "query"/"passage"), put in front of every text."""
        prefix = self.prompt(prompt_name)
        return self.embed_ids(self.tokenize([prefix + t for t in _texts(texts)]), dimensions).vectors

    def prompt(self, name: str | None) -> str:
        prompts = dict(self.record.prompts)
        if name is None:
            return ""
        if name not in prompts:
            have = ", ".join(sorted(prompts)) or "none"
            raise UserError(f"model {self.name} has no prompt named {name!r} (its prompts: {have})")
        return prompts[name]

    def embed_ids(self, ids: Sequence[Sequence[int]], dimensions: int | None = None) -> Embeddings:
        """Vectors for texts given as token ids (the tokenizer's specials already in)."""
        width = self.check_dimensions(dimensions)
        rows = [self._check_ids(i, r) for i, r in enumerate(ids)]
        if not rows:
            raise UserError("no input to embed: give at least one text")
        out = np.empty((len(rows), self.record.dimensions), np.float32)
        for batch in _batches(rows):
            out[batch] = self._run([rows[i] for i in batch])
        return Embeddings(_finish(out, self.record, width), tuple(len(r) for r in rows))

    def check_dimensions(self, dimensions: int | None) -> int:
        """The vector length a request for `dimensions` gets; a clear error when the model cannot give it."""
        full = self.record.dimensions
        if dimensions is None or dimensions == full:
            return full
        if not self.record.matryoshka:
            raise UserError(f"model {self.name} gives {full}-dimensional embeddings only: it was not trained to be "
                            f"shortened (its export records no Matryoshka support); omit dimensions or ask for {full}")
        if not 1 <= dimensions <= full:
            raise UserError(f"dimensions must be from 1 to {full} for model {self.name}, got {dimensions}")
        return dimensions

    def _check_ids(self, i: int, row: Sequence[int]) -> list[int]:
        row = [int(t) for t in row]
        if not row:
            raise UserError(f"input {i} is empty: give at least one token (an empty string has none to embed)")
        if len(row) > self.max_tokens:
            raise ContextLengthError(f"input {i} has {len(row)} tokens; model {self.name} takes at most "
                                     f"{self.max_tokens}: shorten or split the text")
        bad = next((t for t in row if not 0 <= t < self.vocab_size), None)
        if bad is not None:
            raise UserError(f"input {i} has token id {bad}, outside model {self.name}'s vocabulary [0, "
                            f"{self.vocab_size})")
        return row

    def _run(self, rows: list[list[int]]) -> np.ndarray:
        """Pooled (unnormalized) vectors of one padded batch.  # (rows, hidden)"""
        n, longest = len(rows), max(len(r) for r in rows)
        lengths = np.array([len(r) for r in rows], np.int64)  # (batch,)
        ids = np.full((n, longest), self.pad_id, np.int64)  # (batch, sequence_length), right-padded
        for i, r in enumerate(rows):
            ids[i, : len(r)] = r
        mask = (np.arange(longest)[None, :] < lengths[:, None]).astype(np.int64)
        feed = {INPUT_IDS: ids, ATTENTION_MASK: mask}
        if QUERY_SEQLENS in self.inputs:  # a decoder graph: one cacheless pass, empty pasts
            feed[QUERY_SEQLENS] = lengths
            empty = np.zeros((n, self.kv_shape[0], 0, self.kv_shape[1]), self.dtype)  # (batch, kv_heads, 0, head_dim)
            feed.update({name: empty for name in self.inputs if name.startswith(PAST_PREFIX)})
        if TOKEN_TYPE_IDS in self.inputs:  # optimum's BERT-likes: one segment
            feed[TOKEN_TYPE_IDS] = np.zeros_like(ids)
        if POSITION_IDS in self.inputs:
            feed[POSITION_IDS] = np.broadcast_to(np.arange(longest, dtype=np.int64), (n, longest)).copy()
        hidden = self.session.run([LAST_HIDDEN_STATE], feed)[0].astype(np.float32)  # (batch, seq, hidden)
        return pool(hidden, lengths, self.record.pooling)


def pool(hidden: np.ndarray, lengths: np.ndarray, pooling: str) -> np.ndarray:
    """One vector per row over its first `lengths[i]` positions.  # (batch, seq, hidden) -> (batch, hidden)"""
    real = (np.arange(hidden.shape[1])[None, :] < lengths[:, None])[:, :, None]  # (batch, seq, 1)
    if pooling == "mean":
        return np.where(real, hidden, 0).sum(axis=1) / lengths[:, None].astype(np.float32)
    if pooling == "cls":
        return hidden[:, 0]
    if pooling == "last_token":
        return hidden[np.arange(len(lengths)), lengths - 1]
    if pooling == "max":
        return np.where(real, hidden, -np.inf).max(axis=1)
    raise ModelFileError(f"pooling '{pooling}' is not supported")


def _finish(vectors: np.ndarray, record: EmbeddingRecord, width: int) -> np.ndarray:
    """Matryoshka truncation to `width`, then L2 normalization (always after a truncation)."""
    out = vectors[:, :width]
    if record.normalize or width != record.dimensions:
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        out = out / np.maximum(norms, 1e-12)
    return np.ascontiguousarray(out, dtype=np.float32)


def _batches(rows: list[list[int]]) -> list[list[int]]:
    """Indices of `rows` grouped by length (longest first), each group within BATCH_ROWS and BATCH_TOKENS."""
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i]))
    groups: list[list[int]] = []
    for i in order:
        g = groups[-1] if groups else None
        if g is None or len(g) >= BATCH_ROWS or (len(g) + 1) * len(rows[g[0]]) > BATCH_TOKENS:
            groups.append([i])
        else:
            g.append(i)
    return groups


def _texts(texts: Sequence[str] | str) -> list[str]:
    if isinstance(texts, str):
        return [texts]
    out = list(texts)
    for i, t in enumerate(out):
        if not isinstance(t, str):
            raise UserError(f"input {i} is {type(t).__name__}, expected a string")
        if not t:
            raise UserError(f"input {i} is an empty string: there is nothing to embed")
    return out


def load_embedding(path: str | os.PathLike, threads: int | None = None, verify: bool = True,
                   device: str = "auto") -> EmbeddingModel:
    """Open an embedding folder (a path, or a model store name); a text-generation folder gets an error
    that says what to export instead."""
    manifest = load_manifest(path, verify=verify)
    if manifest.task != TASK_EMBED:
        raise UserError(f"model {manifest.folder.name} is a text-generation model ({manifest.geometry.architecture}) "
                        "and has no embedding output: export an embedding model (`edge-infer export SRC --task embed "
                        "-o OUT`, or an encoder folder such as BERT) and embed with that")
    return EmbeddingModel(manifest, threads, device)


def embed(model: EmbeddingModel | str | os.PathLike, texts: Sequence[str] | str, dimensions: int | None = None,
          threads: int | None = None, prompt_name: str | None = None, device: str = "auto") -> np.ndarray:
    """Embed `texts` (a string or a list) with `model` (a loaded EmbeddingModel, a folder path or a store name):
    (len(texts), dimensions) float32, L2-normalized when the model's record says so."""
    if not isinstance(model, EmbeddingModel):
        model = load_embedding(model, threads=threads, device=device)
    return model.embed(_texts(texts), dimensions, prompt_name)
