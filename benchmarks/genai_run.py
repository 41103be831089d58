"""Greedy ids from onnxruntime-genai on an edge-infer model folder (run with a python that has
onnxruntime_genai, e.g. the `.venv-genai` that `make test-genai` builds).

    python benchmarks/genai_run.py MODEL_DIR --ids 5,17,33 --new 16   # prints {"ids": [...], "text_ids": [...]}

`text_ids` are genai's own tokenization of --text (when given), to compare tokenizers too.
"""

import argparse
import json

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--ids", required=True, help="prompt token ids, comma-separated")
    ap.add_argument("--new", type=int, default=16)
    ap.add_argument("--text", default=None)
    args = ap.parse_args()
    import onnxruntime_genai as og  # after the arguments: `--help` works in any venv

    model = og.Model(args.model)
    prompt = [int(i) for i in args.ids.split(",")]
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt) + args.new, do_sample=False)
    gen = og.Generator(model, params)
    gen.append_tokens(np.asarray([prompt], dtype=np.int32))
    out: list[int] = []
    while not gen.is_done() and len(out) < args.new:
        gen.generate_next_token()
        out.append(int(gen.get_next_tokens()[0]))
    result = {"ids": out, "genai": og.__version__ if hasattr(og, "__version__") else "?"}
    if args.text is not None:
        result["text_ids"] = [int(i) for i in og.Tokenizer(model).encode(args.text)]
    print(json.dumps(result))


if __name__ == "__main__":
    main()
