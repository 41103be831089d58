"""onnxruntime-genai's decoder graph run directly under onnxruntime, with profiling: kernel time per op type
and kernel calls per decode step, to set beside profile_ops.py's numbers for an edge-infer model.

    .venv/bin/python benchmarks/profile_genai_graph.py GENAI_FOLDER [--prompt-tokens 128] [--steps 64]
        [--no-profile]

Binds the inputs as genai does with past_present_share_buffer: one KV buffer per layer of the run's full
length, bound as both past_key_values.N and present.N (GroupQueryAttention writes the new row in place),
attention_mask all ones of the total length, one session with 2 intra-op threads and 1 inter-op thread.
The prompt is random token ids (timing only). --no-profile times the same steps without profiling.
"""

from __future__ import annotations

import argparse
import collections
import json
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folder")
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-profile", action="store_true")
    args = ap.parse_args()
    cfg = json.loads((Path(args.folder) / "genai_config.json").read_text())["model"]["decoder"]
    o = ort.SessionOptions()
    o.intra_op_num_threads, o.inter_op_num_threads = args.threads, 1
    o.enable_profiling = not args.no_profile
    o.profile_file_prefix = "/tmp/speed/genai-profile"
    s = ort.InferenceSession(str(Path(args.folder) / cfg["filename"]), o, providers=["CPUExecutionProvider"])
    total = args.prompt_tokens + args.steps + 1
    kv = [ort.OrtValue.ortvalue_from_numpy(np.zeros((1, cfg["num_key_value_heads"], total, cfg["head_size"]),
                                                    np.float32)) for _ in range(2 * cfg["num_hidden_layers"])]
    rng = np.random.default_rng(0)

    def run(ids: np.ndarray, seen: int) -> int:
        b = s.io_binding()
        b.bind_cpu_input("input_ids", ids[None, :].astype(np.int64))
        b.bind_cpu_input("attention_mask", np.ones((1, seen + len(ids)), np.int64))
        for i in range(cfg["num_hidden_layers"]):
            for j, kind in enumerate(("key", "value")):
                b.bind_ortvalue_input(f"past_key_values.{i}.{kind}", kv[2 * i + j])
                b.bind_ortvalue_output(f"present.{i}.{kind}", kv[2 * i + j])
        b.bind_output("logits")
        s.run_with_iobinding(b)
        return int(np.argmax(b.get_outputs()[0].numpy()[0, -1]))

    tok = run(rng.integers(100, 40000, args.prompt_tokens), 0)
    start = time.perf_counter()
    for k in range(args.steps):
        tok = run(np.array([tok]), args.prompt_tokens + k)
    wall = (time.perf_counter() - start) / args.steps
    print(f"decode wall {wall * 1e3:.2f} ms/step ({1 / wall:.1f} tok/s), {len(s.get_inputs())} inputs")
    if args.no_profile:
        return
    trace = json.loads(Path(s.end_profiling()).read_text())
    runs = [(e["ts"], e["ts"] + e["dur"]) for e in trace if e.get("name") == "model_run"][1:]
    by_op: dict = collections.Counter()
    calls = 0
    for e in trace:
        if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time") and any(
                a <= e["ts"] <= b for a, b in runs):
            op = e["args"].get("op_name", "?") + (" (lm_head)" if "lm_head" in e["name"] else "")
            by_op[op] += e["dur"]
            calls += 1
    n = len(runs)
    kern = sum(by_op.values()) / n / 1e3
    print(f"decode: {n} runs; model_run {sum(b - a for a, b in runs) / n / 1e3:.2f} ms, kernels {kern:.2f} ms, "
          f"{calls // n} kernel calls")
    for op, us in by_op.most_common():
        print(f"  {op:34s} {us / n / kern / 1e3 * 100:5.1f}%  {us / n / 1e3:8.3f} ms/run")


if __name__ == "__main__":
    main()
