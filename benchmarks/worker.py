"""One engine, one prompt, in its own process: `benchmarks/sidebyside.py` starts one per measurement.

    PYTHON benchmarks/worker.py ENGINE MODEL --ids ids.json --new-tokens 128 --threads 2

ENGINE is edge (edge-infer, from this repo's .venv), genai (onnxruntime-genai) or llamacpp
(llama-cpp-python), each run by the python of its own virtual environment. Every engine is
timed by the same code, bench/measure.py loaded by file path (it needs only numpy), on the
same prompt token ids, greedy, eos ignored. Prints one JSON object: the runs, the engine's
version and load time; peak RSS is this process's, so it covers one engine and one prompt.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent


def load_measure():
    spec = importlib.util.spec_from_file_location("edge_measure", REPO / "bench" / "measure.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["edge_measure"] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


def edge(model: str, threads: int, new_tokens: int, measure):
    import edge_infer

    m = edge_infer.load(model, device="cpu", threads=threads)
    prefill, step = measure.edge_engine(m, new_tokens)
    return prefill, step, f"edge-infer {edge_infer.__version__} ({m.manifest.quant_scheme})"


def genai(model: str, threads: int, new_tokens: int, measure):
    import onnxruntime_genai as og

    config = og.Config(model)
    config.overlay(json.dumps({"model": {"decoder": {"session_options": {
        "intra_op_num_threads": threads, "inter_op_num_threads": 1}}}}))
    m = og.Model(config)
    state = {}

    def prefill(ids) -> int:
        # One generator per request, sized to it; min_length keeps eos from ending the run early.
        params = og.GeneratorParams(m)
        total = len(ids) + new_tokens
        params.set_search_options(max_length=total, min_length=total, do_sample=False)
        gen = og.Generator(m, params)
        gen.append_tokens(np.asarray(ids, dtype=np.int32)[None, :])  # runs the prompt
        gen.generate_next_token()  # picks the first token from the prompt's logits
        state["gen"] = gen
        return int(gen.get_next_tokens()[0])

    def step(token: int) -> int:
        gen = state["gen"]  # it feeds its own last token
        gen.generate_next_token()
        return int(gen.get_next_tokens()[0])

    return prefill, step, f"onnxruntime-genai {og.__version__}"


def llamacpp(model: str, threads: int, new_tokens: int, measure, n_ctx: int):
    import llama_cpp

    llm = llama_cpp.Llama(model_path=model, n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads,
                          verbose=False)

    vocab = llm.n_vocab()

    def last_logits() -> np.ndarray:
        # Without logits_all, llama.cpp keeps logits only for the last token of a batch (and
        # llama-cpp-python no longer copies them into Llama.scores): read them in place.
        return np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(vocab,))

    def prefill(ids) -> int:
        llm.reset()  # eval() then clears the KV cache from position 0: no prefix reuse
        llm.eval(list(ids))
        return int(np.argmax(last_logits()))

    def step(token: int) -> int:
        llm.eval([token])
        return int(np.argmax(last_logits()))

    return prefill, step, f"llama-cpp-python {llama_cpp.__version__} (n_batch {llm.n_batch})"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("engine", choices=["edge", "genai", "llamacpp"])
    ap.add_argument("model")
    ap.add_argument("--ids", required=True, help="JSON file with a list of prompt token ids")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--warmup-tokens", type=int, default=8,
                    help="New tokens in a warmup run: the full prompt runs, then only a few decode steps.")
    args = ap.parse_args()
    measure = load_measure()
    ids = json.loads(Path(args.ids).read_text())
    start = time.perf_counter()
    if args.engine == "edge":
        prefill, step, version = edge(args.model, args.threads, args.new_tokens, measure)
    elif args.engine == "genai":
        prefill, step, version = genai(args.model, args.threads, args.new_tokens, measure)
    else:
        prefill, step, version = llamacpp(args.model, args.threads, args.new_tokens, measure,
                                          n_ctx=len(ids) + args.new_tokens)
    load_s = time.perf_counter() - start
    rss_loaded = measure.peak_rss_mib()
    for _ in range(args.warmup):
        measure.time_generation(prefill, step, ids, min(args.warmup_tokens, args.new_tokens))
    runs = [measure.time_generation(prefill, step, ids, args.new_tokens).as_dict() for _ in range(args.runs)]
    print(json.dumps({"engine": args.engine, "version": version, "load_s": load_s, "rss_after_load_mib": rss_loaded,
                      "runs": runs, "machine": measure.describe_machine(args.threads)}))


if __name__ == "__main__":
    main()
