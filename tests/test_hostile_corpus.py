"""Issue 10, the malformed-input corpus: ~1,750 generated cases (tests/hostile_corpus.py) plus the fuzzer's
findings (tests/corpus/found/), each parsed in a child process under a 2 GiB address-space cap and a time
limit. Every case must end in our own error type or parse; none may crash, hang or exhaust memory."""

from __future__ import annotations

import collections
import re
from pathlib import Path

import pytest
from test_gguf_file import tiny_llama

from bounded import run_cases
from hostile_corpus import generate

FOUND = Path(__file__).parent / "corpus" / "found"
# Mutations that leave a file that is still valid (a value nothing reads, an odd but legal number).
BENIGN = re.compile(r"^(gguf: kv:test\.|gguf: kv:llama\.rope\.freq_base|gguf: duplicate cd -> ab"
                    r"|tokenizer: (vocab id 2\*\*31|added token id 2\*\*30)|manifest: )")
MANIFEST_MUST_REFUSE = re.compile(
    r"^manifest: (model\.(num_layers|num_heads|num_kv_heads|head_dim|hidden_size|vocab_size|max_length"
    r"|context_length)=|graph\.(file|inputs|outputs|dtype)=|tokenizer\.file=|files|truncated|not an object"
    r"|duplicate key|5000-digit|deep nesting|format version|(model|graph|tokenizer)=)")


def found_cases() -> list[tuple[str, str, str]]:
    """Fuzzer findings kept as files: tests/corpus/found/<kind>-<name>."""
    out = []
    for p in sorted(FOUND.glob("*")):
        kind = p.name.split("-", 1)[0]
        if kind in ("gguf", "safetensors"):
            out.append((f"found: {p.name}", kind, str(p)))
    return out


@pytest.mark.slow
def test_every_malformed_input_is_a_clean_error_within_bounds(tmp_path, tiny_exports):
    tiny_llama(tmp_path)
    cases = generate(tmp_path / "corpus", tmp_path / "llama.gguf", tiny_exports("llama", "fp32")) + found_cases()
    results = run_cases(cases, timeout=600)
    counts = collections.Counter((kind, results[cid].status) for cid, kind, _ in cases)
    print(dict(counts))
    bad = [(cid, results[cid]) for cid, _, _ in cases if results[cid].status not in ("ok", "clean")]
    assert not bad, bad[:10]
    accepted = [cid for cid, _, _ in cases if results[cid].status == "ok" and not BENIGN.match(cid)]
    assert not accepted, accepted[:10]
    refused_late = [cid for cid, _, _ in cases if MANIFEST_MUST_REFUSE.match(cid) and results[cid].status != "clean"]
    assert not refused_late, refused_late[:10]
    assert len(cases) > 1500 and sum(n for (_, s), n in counts.items() if s == "clean") > 1400
