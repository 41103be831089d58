"""Run model folders under whichever onnxruntime this Python has; print one JSON line.

    PYTHON tests/ort_floor_probe.py '{"name": "/path/to/folder", ...}' [compat]

tests/test_ort_floor.py runs it under onnxruntime 1.32 (.venv) and under older releases
(.venv-ort-1.24.4, .venv-ort-1.31.1) and compares. Per folder: the graph header the runtime
picked and what it says the release costs, greedy ids of a plain run (speculation on, as
`edge-infer run` does), the ids of two sequences decoded together in one batched cache with
lookup speculation (rows of different widths: the server's step), and whether a position's
logits in a batched row are the same bits as in one pass over the sequence. With `compat`, the
runtime is told GroupQueryAttention lacks query_seqlens, so onnxruntime 1.32 runs the header the
older releases load (the reference for their batched passes).
"""

from __future__ import annotations

import json
import sys

import numpy as np

# Text, not random ids: a real model's greedy choice between near-tied logits would follow the last
# bits of whichever kernel ran. Repeats give lookup speculation guesses to verify.
PROMPT = "The capital of France is Paris. The capital of Japan is Tokyo. The capital of France is"
OTHER = "Water boils at 100 degrees. Water freezes at 0 degrees. Water boils at"
N = 16


def together(m, prompts: list[list[int]]) -> dict:
    """Greedy decoding of each prompt side by side in one batched cache (lookup speculation where the
    runtime allows it in a batched pass): per row the ids, and per sampled logits row [id, its logit,
    the runner-up's logit]."""
    from edge_infer.runtime.decode import Decoding, decode_step, prefill
    from edge_infer.runtime.sampling import SamplingParams, make_sampler
    from edge_infer.runtime.speculative import speculative_config

    greedy = make_sampler(SamplingParams())
    seen: list[list[list[float]]] = [[] for _ in prompts]

    def sampler_for(r: int):
        def sample(logits, tokens, n_prompt):
            top = np.argsort(logits)[-2:]
            seen[r].append([int(top[1]), float(logits[top[1]]), float(logits[top[0]])])
            return greedy(logits, tokens, n_prompt)
        sample.params = greedy.params  # type: ignore[attr-defined]  # speculation reads the sampler's params
        return sample

    cache = m.new_cache(batch=len(prompts))
    decodings = []
    for r, ids in enumerate(prompts):
        row = cache.row(r)
        d = Decoding(m, ids, sampler_for(r), row, speculative_config("lookup"))
        d.first(prefill(m, ids, row))
        decodings.append(d)
    while min(len(d.tokens) - d.n_prompt for d in decodings) < N:
        limits = [3 if len(d.tokens) - d.n_prompt < N else 0 for d in decodings]
        decode_step(m, cache, list(decodings), limits)
    return {"ids": [d.tokens[d.n_prompt:d.n_prompt + N] for d in decodings], "steps": [row[:N] for row in seen]}


def batched_row_is_one_pass(m, ids: list[int], other: list[int]) -> bool:
    """Row 1 of batch-3 passes (row 0 feeding 3 ids, row 2 idle) against one pass over the ids."""
    ref = m.forward(np.array([ids]), m.new_cache(), logits_to_keep=len(ids))[0]
    cache, rows = m.new_cache(batch=3), []
    for i, t in enumerate(ids):
        feeds = [other[3 * i % 9:3 * i % 9 + 3], [t], []]
        rows.append(m.forward_rows(feeds, cache)[1][0])  # each row advances by its feed
    return bool(np.array_equal(np.stack(rows), ref))


def run(folder: str) -> dict:
    import edge_infer
    from edge_infer.runtime.decode import decode_tokens
    from edge_infer.runtime.sampling import SamplingParams, make_sampler
    from edge_infer.runtime.speculative import speculative_config

    m = edge_infer.load(folder, device="cpu", threads=2)
    prompt, other = (m.tokenizer.encode(t, add_special_tokens=False) for t in (PROMPT, OTHER))
    plain = list(decode_tokens(m, prompt, m.new_cache(), make_sampler(SamplingParams()), N,
                               speculative_config("auto"), ignore_eos=True))
    return {"header": m.header.file, "ragged_rows": m.ragged_rows, "graph": m.describe_graph(), "ids": plain,
            "together": together(m, [prompt, other]), "batch_invariant": m.batch_invariant,
            "batched_row_is_one_pass": batched_row_is_one_pass(m, prompt[:12], other)}


def main() -> None:
    import onnxruntime

    if sys.argv[2:] == ["compat"]:
        from edge_infer.contract.io_names import QUERY_SEQLENS
        from edge_infer.devices import capabilities

        capabilities.knows_attention_input = lambda name: name != QUERY_SEQLENS  # type: ignore[assignment]
    out: dict = {"onnxruntime": onnxruntime.__version__, "models": {}}
    for name, folder in json.loads(sys.argv[1]).items():
        try:
            out["models"][name] = run(folder)
        except Exception as e:  # reported, so the caller names the model and the release
            out["models"][name] = {"error": f"{type(e).__name__}: {str(e)[:400]}"}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
