"""Pick the quick-start question (`make demo`) by measurement: a question whose greedy answer cannot flip.

    .venv/bin/python benchmarks/demo_question.py [--work out/demo-question] [--threads 1] [--json FILE]

Exports the built-in default model (SmolLM2-135M-Instruct Q4_1 GGUF) three ways, once (reused from
--work afterwards; --force redoes them):

  fp32   --quant fp32
  int4   --quant int4, the default export `make demo` runs (accuracy_level 4: int8 activations)
  int4a0 --quant int4 --accuracy-level 0 (float activations)

then renders each candidate question exactly as `edge-infer run MODEL "QUESTION"` does (one user
message through the model's chat template, with the template's own default system prompt;
runtime/generate.py encode_prompt) and decodes greedily with plain one-token steps up to the eos
or --max-tokens. For every generated token it records the top-1 minus top-2 logit margin.

Columns per export: `first` (the first token's margin), `key` (the smallest margin over the tokens up to
and including the one that completes the key word), `all` (the smallest over the whole answer, the
eos step included). `same`: the three greedy answers are the same ids; `ok`: the key word is in every
answer. A question qualifies when `key` >= 1 logit under all three exports, the answers are the
same and correct, and the answer ends (eos) within --max-tokens. Qualifying questions are ranked:
those whose whole answer clears 1 logit (`all` >= 1 under every export) first, then by the smallest
`key` (the tokens that decide whether the answer is right).

Measured (2026-12, Intel Xeon, onnxruntime 1.32.0, 1 thread; 43 candidates, about 12 minutes on a
loaded 2-core machine): 11 qualify, 2 with the whole answer above 1 logit: "What is the capital city
of Japan?" (key 2.55, all 1.33: chosen) and "What is the capital of South Korea?" (key 1.62, all 1.61).
The int4a0 column equals fp32 to 3 decimals: the GGUF's Q4_1 blocks import exactly, so with float
activations int4 computes fp32's function; the int8 activations of the default int4 are what differ.

Why a margin of 1: on an AMD EPYC (AVX-512, VNNI) the int4 kernels give logits that differ from this
Intel Xeon's and between one-row and multi-row passes by up to 0.92 (issue 20); the former demo
question's first token was a 0.03-logit tie that flipped between the two CPUs.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

EXPORTS = {  # name -> ExportOptions keywords (validation skipped: it does not change the graph)
    "fp32": {"quant": "fp32"},
    "int4": {"quant": "int4"},
    "int4a0": {"quant": "int4", "accuracy_level": 0},
}

# question -> the key words a correct answer contains (any of them, case-insensitive)
CANDIDATES = {
    "Which city is the capital of France?": ["Paris"],
    "What is the capital of France?": ["Paris"],
    "What is the capital of Japan?": ["Tokyo"],
    "What is the capital of Italy?": ["Rome"],
    "What is the capital of Germany?": ["Berlin"],
    "What is the capital of China?": ["Beijing"],
    "What is the capital of Russia?": ["Moscow"],
    "What is the capital of Egypt?": ["Cairo"],
    "What is the capital of Greece?": ["Athens"],
    "What is the capital of Portugal?": ["Lisbon"],
    "What is the capital of India?": ["New Delhi"],
    "What is the capital of South Korea?": ["Seoul"],
    "What is the capital of Ireland?": ["Dublin"],
    "What is the capital of England?": ["London"],
    "Which city is the capital of Japan?": ["Tokyo"],
    "What is the capital city of Japan?": ["Tokyo"],
    "What is the capital of Spain?": ["Madrid"],
    "What is the capital of the United Kingdom?": ["London"],
    "What is the capital of Canada?": ["Ottawa"],
    "What is the largest planet in the solar system?": ["Jupiter"],
    "Which planet is known as the Red Planet?": ["Mars"],
    "What is the largest ocean on Earth?": ["Pacific"],
    "What is the tallest mountain in the world?": ["Everest"],
    "What is the largest continent?": ["Asia"],
    "In which country is the Eiffel Tower?": ["France"],
    "What language is spoken in Brazil?": ["Portuguese"],
    "How many days are in a week?": ["seven", "7"],
    "How many months are in a year?": ["twelve", "12"],
    "How many hours are in a day?": ["24", "twenty-four", "twenty four"],
    "How many continents are there?": ["seven", "7"],
    "How many legs does a spider have?": ["eight", "8"],
    "What is 2 + 2?": ["4", "four"],
    "What is the boiling point of water in degrees Celsius?": ["100"],
    "What is the freezing point of water in degrees Celsius?": ["0 ", "0°", "zero"],
    "What is the chemical formula of water?": ["H2O", "H₂O"],
    "What color is the sky on a clear day?": ["blue"],
    "What gas do plants absorb from the air?": ["carbon dioxide", "CO2"],
    "Who wrote Romeo and Juliet?": ["Shakespeare"],
    "Who painted the Mona Lisa?": ["Leonardo", "da Vinci"],
    "Who was the first person to walk on the Moon?": ["Armstrong"],
    "What is the largest animal on Earth?": ["blue whale"],
    "What is the closest star to Earth?": ["Sun"],
    "What do bees make?": ["honey"],
}


def makefile_question(makefile: Path = ROOT / "Makefile") -> str:
    """The question `make demo` asks: the Makefile's `QUESTION ?= ...` line."""
    m = re.search(r"^QUESTION\s*\?=\s*(.+?)\s*$", makefile.read_text(), re.M)
    if m is None:
        raise SystemExit(f"no 'QUESTION ?=' line in {makefile}")
    return m.group(1)


def export_all(work: Path, force: bool, names=EXPORTS) -> dict[str, Path]:
    from edge_infer.export.export_folder import ExportOptions, export_model
    from edge_infer.export.sources import default_model_path

    src = default_model_path()
    folders = {}
    for name in names:
        folder = work / name
        if force or not (folder / "manifest.json").is_file():
            print(f"exporting {name} -> {folder}", file=sys.stderr, flush=True)
            export_model(src, folder, ExportOptions(validate=False, force=True, **EXPORTS[name]))
        folders[name] = folder
    return folders


def greedy_margins(model, question: str, max_tokens: int) -> tuple[list[int], list[float], list[int]]:
    """Greedy ids of the answer `edge-infer run` gives (plain one-token steps), each step's top-1 minus
    top-2 logit margin, and each step's runner-up id. The eos id, when reached, is the last entry."""
    from edge_infer.runtime.generate import encode_prompt

    ids = encode_prompt(model, [{"role": "user", "content": question}])
    cache = model.new_cache()
    logits = model.forward(np.array([ids]), cache)[0, -1]
    out, margins, second = [], [], []
    for _ in range(max_tokens):
        top2 = np.argpartition(logits, -2)[-2:]
        top, runner = (top2[1], top2[0]) if logits[top2[1]] >= logits[top2[0]] else (top2[0], top2[1])
        out.append(int(top))
        second.append(int(runner))
        margins.append(float(logits[top] - logits[runner]))
        if out[-1] in model.tokenizer.eos_ids:
            break
        logits = model.forward(np.array([[out[-1]]]), cache)[0, -1]
    return out, margins, second


def key_index(model, ids: list[int], keys: list[str]) -> int | None:
    """Index of the token whose text completes the first key word, or None if no key word appears."""
    lowered = [k.lower() for k in keys]
    for i in range(len(ids)):
        text = model.tokenizer.decode(ids[:i + 1]).lower()
        if any(k in text for k in lowered):
            return i
    return None


def scan(models: dict, questions: dict[str, list[str]], max_tokens: int) -> list[dict]:
    rows = []
    for q, keys in questions.items():
        row = {"question": q, "keys": keys, "exports": {}}
        for name, model in models.items():
            ids, margins, second = greedy_margins(model, q, max_tokens)
            k = key_index(model, ids, keys)
            weakest = int(np.argmin(margins))
            row["exports"][name] = {
                "ids": ids,
                "answer": model.tokenizer.decode(ids).strip(),
                "eos": ids[-1] in model.tokenizer.eos_ids,
                "first": margins[0],
                "key": min(margins[:k + 1]) if k is not None else None,
                "all": min(margins),
                "weakest": {"step": weakest, "token": model.tokenizer.decode([ids[weakest]], skip_special_tokens=False),
                            "runner_up": model.tokenizer.decode([second[weakest]], skip_special_tokens=False)},
                "margins": [round(m, 3) for m in margins],
            }
        ex = row["exports"].values()
        row["same"] = len({tuple(e["ids"]) for e in ex}) == 1
        row["same_first_15"] = len({tuple(e["ids"][:15]) for e in ex}) == 1
        row["correct"] = all(e["key"] is not None for e in ex)
        row["ended"] = all(e["eos"] for e in ex)
        row["min_key"] = min(e["key"] for e in ex) if row["correct"] else None
        row["min_all"] = min(e["all"] for e in ex)
        row["qualifies"] = bool(row["correct"] and row["same"] and row["ended"] and row["min_key"] >= 1.0)
        rows.append(row)
        print(f"  scanned: {q}", file=sys.stderr, flush=True)
    return rows


def print_table(rows: list[dict], names: list[str], current: str) -> None:
    def fmt(v):
        return "   -" if v is None else f"{v:5.2f}"

    head = " | ".join(f"{n:^17}" for n in names)
    print(f"{'question':<56} | {head} | same ok end | tokens | answer (int4)")
    print(f"{'':<56} | " + " | ".join(f"{'first':>5} {'key':>5} {'all':>5}" for _ in names) + " |")
    for r in rows:
        cols = " | ".join(f"{fmt(r['exports'][n]['first'])} {fmt(r['exports'][n]['key'])} {fmt(r['exports'][n]['all'])}"
                          for n in names)
        flags = f"{'y' if r['same'] else ('15' if r['same_first_15'] else 'n'):>4} {'y' if r['correct'] else 'n':>2} " \
                f"{'y' if r['ended'] else 'n':>3}"
        mark = ("*" if r["qualifies"] else " ") + (">" if r["question"] == current else " ")
        ans = r["exports"]["int4"]["answer"].replace("\n", " ")
        print(f"{mark}{r['question']:<54} | {cols} | {flags} | {len(r['exports']['int4']['ids']):>6} | {ans[:90]}")
    print("\n* qualifies (key >= 1 under every export, same ids, key word present, ends within the budget); "
          "> the Makefile's QUESTION")
    ranked = sorted((r for r in rows if r["qualifies"]), key=lambda r: (r["min_all"] < 1.0, -r["min_key"]))
    for r in ranked[:8]:
        weak = min(((n, r["exports"][n]) for n in names), key=lambda t: t[1]["all"])
        print(f"  min all {r['min_all']:5.2f}  min key {r['min_key']:5.2f}  {r['question']}  "
              f"(weakest: {weak[0]} step {weak[1]['weakest']['step']} {weak[1]['weakest']['token']!r} "
              f"vs {weak[1]['weakest']['runner_up']!r})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=ROOT / "out" / "demo-question", help="where the three exports live")
    ap.add_argument("--force", action="store_true", help="export again even if the folders exist")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--max-tokens", type=int, default=40)
    ap.add_argument("--question", action="append", default=None,
                    help="scan only this question (repeatable; key word: --key applies to all)")
    ap.add_argument("--key", action="append", default=None, help="key word for --question")
    ap.add_argument("--json", type=Path, default=None, help="write every margin here")
    args = ap.parse_args()

    import edge_infer

    current = makefile_question()
    if args.question:
        questions = {q: args.key or CANDIDATES.get(q, [""]) for q in args.question}
    else:
        questions = dict(CANDIDATES)
        questions.setdefault(current, [""])
    folders = export_all(args.work, args.force)
    models = {n: edge_infer.load(f, device="cpu", threads=args.threads) for n, f in folders.items()}
    rows = scan(models, questions, args.max_tokens)
    print_table(rows, list(models), current)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
