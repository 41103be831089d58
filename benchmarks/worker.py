"""One engine, one prompt, in its own process: `benchmarks/sidebyside.py` starts one per measurement.

    PYTHON benchmarks/worker.py ENGINE MODEL --ids ids.json --new-tokens 128 --threads 2

ENGINE is edge (edge-infer, from this repo's .venv), genai (onnxruntime-genai) or llamacpp
(llama-cpp-python), each run by the python of its own virtual environment. Every engine is
timed by the same code, bench/measure.py loaded by file path (it needs only numpy), on the
same prompt token ids, greedy, eos ignored. Prints one JSON object: the runs, the engine's
version and load time; peak RSS is this process's, so it covers one engine and one prompt.

--ids may also hold an object {name: ids} (several prompts, e.g. the grounded tasks): one load,
one warmup on the first prompt, then one timed run per prompt (`task` names it, `ids` keeps the
generated ids). --speculative auto|lookup (edge only) decodes with edge-infer's speculation
(runtime.speculative, eos ignored) instead of plain steps; each run then records its acceptance.
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


def vm_hwm_mib() -> float | None:
    """This process's peak resident memory since it started (Linux VmHWM), None elsewhere.

    Not getrusage's ru_maxrss (what bench.measure.peak_rss_mib read before): on Linux that keeps the high-water
    mark of the memory a process had before exec, so a worker started by a harness holding 1 GiB
    reports at least the harness's peak (Python's subprocess starts children with vfork)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def edge(model: str, threads: int, new_tokens: int, measure):
    import edge_infer

    m = edge_infer.load(model, device="cpu", threads=threads)
    prefill, step = measure.edge_engine(m, new_tokens)
    return prefill, step, f"edge-infer {edge_infer.__version__} ({m.manifest.quant_scheme}; spinning {m.describe_spinning()})"


def edge_spec(model: str, threads: int, new_tokens: int, measure, mode: str):
    """tokens(ids, stats) of edge-infer's speculative decoding (`mode`: auto, lookup), as users get it."""
    import edge_infer
    from edge_infer.runtime.speculative import speculative_config

    m = edge_infer.load(model, device="cpu", threads=threads)
    tokens = measure.edge_speculative(m, speculative_config(mode), new_tokens)
    return tokens, f"edge-infer {edge_infer.__version__} ({m.manifest.quant_scheme}, --speculative {mode})"


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
    ap.add_argument("--ids", required=True, help="JSON file with a list of prompt token ids, or {name: ids}")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--warmup-tokens", type=int, default=8,
                    help="New tokens in a warmup run: the full prompt runs, then only a few decode steps.")
    ap.add_argument("--speculative", default=None, choices=["auto", "lookup"],
                    help="edge only: decode with edge-infer's speculation instead of plain steps.")
    args = ap.parse_args()
    measure = load_measure()
    given = json.loads(Path(args.ids).read_text())
    tasks = given if isinstance(given, dict) else {None: given}
    longest = max(len(v) for v in tasks.values())
    start = time.perf_counter()
    spec = None
    if args.speculative:
        if args.engine != "edge":
            sys.exit("--speculative is edge-infer's (engine edge)")
        spec, version = edge_spec(args.model, args.threads, args.new_tokens, measure, args.speculative)
    elif args.engine == "edge":
        prefill, step, version = edge(args.model, args.threads, args.new_tokens, measure)
    elif args.engine == "genai":
        prefill, step, version = genai(args.model, args.threads, args.new_tokens, measure)
    else:
        prefill, step, version = llamacpp(args.model, args.threads, args.new_tokens, measure,
                                          n_ctx=longest + args.new_tokens)
    load_s = time.perf_counter() - start
    rss_loaded = vm_hwm_mib() or measure.peak_rss_mib()

    def one(ids: list[int], new_tokens: int) -> dict:
        keep: list[int] = []
        if spec is None:
            stats = measure.time_tokens(measure.step_tokens(prefill, step, ids, new_tokens), len(ids), new_tokens,
                                        keep)
            out = dict(stats.as_dict(), ids=keep)
        else:
            from edge_infer.runtime.speculative import SpecStats

            counts = SpecStats()
            stats = measure.time_tokens(spec(ids, counts), len(ids), new_tokens, keep)
            out = dict(stats.as_dict(), ids=keep, proposed=counts.proposed, accepted=counts.accepted,
                       target_passes=counts.target_passes, acceptance=counts.acceptance_rate)
        out["peak_rss_mib_rusage"] = out["peak_rss_mib"]
        out["peak_rss_mib"] = vm_hwm_mib() or out["peak_rss_mib"]
        return out

    first = next(iter(tasks.values()))
    for _ in range(args.warmup):
        one(first, min(args.warmup_tokens, args.new_tokens))
    runs = []
    for name, ids in tasks.items():
        for _ in range(args.runs):
            run = one(ids, args.new_tokens)
            if name is None:
                run.pop("ids")
            else:
                run["task"] = name
            runs.append(run)
    print(json.dumps({"engine": args.engine, "version": version, "load_s": load_s, "rss_after_load_mib": rss_loaded,
                      "runs": runs, "machine": measure.describe_machine(args.threads)}))


if __name__ == "__main__":
    main()
