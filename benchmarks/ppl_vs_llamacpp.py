"""Perplexity of an edge-infer export against llama.cpp on the same GGUF, on identical token ids.

    .venv/bin/python benchmarks/ppl_vs_llamacpp.py MODEL_FOLDER GGUF --text FILE [--max-tokens 4096]

The text is tokenized once by the export's tokenizer (as `edge-infer eval` does); both engines
score the same ids over the same strided windows (bench/measure.py strided_windows: window 512,
stride 256, each token scored once with up to 511 tokens of context). llama.cpp runs in the
peers' venv (benchmarks/peers.py setup) with all-position logits. Prints both perplexities,
their ratio (edge-infer / llama.cpp) and the top-1 agreement between the two engines at every
scored position; --json writes them. Standard output is one JSON object with --json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

PEERS = Path(os.environ.get("PEERS_DIR", "/work/peers"))

# Runs under llama.cpp's venv: per window, the negative log-likelihood and argmax of every scored target.
LLAMA_WORKER = r"""
import json, sys
import numpy as np
from llama_cpp import Llama
job = json.load(open(sys.argv[1]))
llm = Llama(model_path=job["gguf"], n_ctx=job["window"], n_batch=512, n_threads=job["threads"],
            logits_all=True, verbose=False)
ids = job["ids"]
nll, top = [], []
for begin, end, first in job["windows"]:
    piece = ids[begin:end]
    llm.reset()
    llm.eval(piece)
    logits = np.asarray(llm.scores[:len(piece)], dtype=np.float64)  # (seq, vocab)
    rows = logits[first - 1 - begin:end - 1 - begin]
    rows -= rows.max(axis=-1, keepdims=True)
    lp = rows - np.log(np.exp(rows).sum(axis=-1, keepdims=True))
    targets = np.asarray(ids[first:end])
    nll += (-lp[np.arange(len(targets)), targets]).tolist()
    top += lp.argmax(-1).tolist()
json.dump({"nll": nll, "top": top}, open(sys.argv[2], "w"))
"""


def edge_scores(model, ids: list[int], windows) -> tuple[list[float], list[int]]:
    from edge_infer.bench.measure import edge_logits
    from edge_infer.runtime.sampling import log_softmax

    fn = edge_logits(model)
    nll: list[float] = []
    top: list[int] = []
    tokens = np.asarray(ids, dtype=np.int64)
    for w in windows:
        logits = fn(tokens[w.begin:w.end])[w.first_target - 1 - w.begin:w.end - 1 - w.begin]  # (scored, vocab)
        lp = log_softmax(logits)
        targets = tokens[w.first_target:w.end]
        nll += (-lp[np.arange(len(targets)), targets]).tolist()
        top += lp.argmax(-1).tolist()
    return nll, top


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", help="edge-infer model folder (an export of GGUF)")
    ap.add_argument("gguf", help="the GGUF file llama.cpp reads")
    ap.add_argument("--text", required=True, help="held-out text file")
    ap.add_argument("--max-tokens", type=int, default=4096)
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--stride", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--peers", type=Path, default=PEERS)
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args()

    import edge_infer
    from edge_infer.bench.measure import strided_windows

    model = edge_infer.load(args.model, device="cpu", threads=args.threads)
    ids = model.tokenizer.encode(Path(args.text).read_text(encoding="utf-8"), add_special_tokens=True)
    ids = ids[:args.max_tokens]
    windows = strided_windows(len(ids), args.window, args.stride)
    start = time.perf_counter()
    nll_e, top_e = edge_scores(model, ids, windows)
    edge_s = time.perf_counter() - start
    del model
    with tempfile.TemporaryDirectory() as tmp:
        job, out = Path(tmp) / "job.json", Path(tmp) / "out.json"
        job.write_text(json.dumps({"gguf": str(Path(args.gguf).resolve()), "window": args.window, "ids": ids,
                                   "threads": args.threads,
                                   "windows": [(w.begin, w.end, w.first_target) for w in windows]}))
        py = args.peers / "llamacpp-venv" / "bin" / "python"
        start = time.perf_counter()
        subprocess.run([str(py), "-c", LLAMA_WORKER, str(job), str(out)], check=True)
        llama_s = time.perf_counter() - start
        got = json.loads(out.read_text())
    nll_l, top_l = got["nll"], got["top"]
    assert len(nll_l) == len(nll_e), "both engines score the same positions"
    ppl_e, ppl_l = math.exp(float(np.mean(nll_e))), math.exp(float(np.mean(nll_l)))
    result = {"model": args.model, "gguf": args.gguf, "text": args.text, "tokens": len(ids), "scored": len(nll_e),
              "window": args.window, "stride": args.stride, "edge_perplexity": ppl_e, "llamacpp_perplexity": ppl_l,
              "ratio": ppl_e / ppl_l, "top1_agreement": float(np.mean(np.asarray(top_e) == np.asarray(top_l))),
              "edge_seconds": round(edge_s, 1), "llamacpp_seconds": round(llama_s, 1)}
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{len(nll_e)} tokens scored: edge-infer perplexity {ppl_e:.4f}, llama.cpp {ppl_l:.4f}, "
              f"ratio x{ppl_e / ppl_l:.4f}, top-1 agreement {result['top1_agreement']:.1%}")


if __name__ == "__main__":
    sys.exit(main())
