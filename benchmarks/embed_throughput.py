"""Embeddings per second for a batch of 100 texts, at 1 and 2 threads (issue 23).

    .venv/bin/python benchmarks/embed_throughput.py [--work /tmp/ei-embed-bench] [--quants fp32,int8]
        [--threads 1,2] [--texts 100] [--rounds 5] [--write benchmarks/EMBED_RESULTS.md]

The model is all-MiniLM-L6-v2's shape (BERT, 6 layers, hidden 384, 12 heads, intermediate 1536,
vocabulary 30522, 512 positions) with seeded random weights, saved as a Hugging Face folder with a
mean-pooling + Normalize sentence-transformers pipeline and a WordPiece tokenizer trained on
bench/text (so texts tokenize to realistic lengths), then exported by edge-infer at each
quantization. The texts are chunks of 1 to 4 sentences of bench/text. Each round embeds all
texts in one call (edge_infer's own length-sorted batching); the best and median of the rounds
are reported, with the load average before and after (the machine may be shared).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TEXT_DIR = ROOT / "bench" / "text"
MINILM = dict(vocab_size=30522, hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
              intermediate_size=1536, max_position_embeddings=512, pad_token_id=0)


def texts(n: int) -> list[str]:
    sentences = []
    for path in sorted(TEXT_DIR.glob("*.txt")):
        body = " ".join(path.read_text(encoding="utf-8").split())
        sentences += [s for s in re.split(r"(?<=[.!?])\s+", body) if s]
    out, i, k = [], 0, 0
    while len(out) < n:
        size = 1 + k % 4  # 1, 2, 3, 4 sentences
        out.append(" ".join(sentences[i % len(sentences): i % len(sentences) + size]))
        i, k = i + size, k + 1
    return out


def make_source(folder: Path) -> Path:
    import torch
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import BertConfig, BertModel

    folder.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    corpus = [p.read_text(encoding="utf-8") for p in sorted(TEXT_DIR.glob("*.txt"))]
    tok.train_from_iterator(corpus, trainers.WordPieceTrainer(vocab_size=8000, special_tokens=specials,
                                                              show_progress=False))
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[
        ("[CLS]", tok.token_to_id("[CLS]")), ("[SEP]", tok.token_to_id("[SEP]"))])
    tok.save(str(folder / "tokenizer.json"))
    torch.manual_seed(0)
    BertModel(BertConfig(**MINILM), add_pooling_layer=False).eval().save_pretrained(folder, safe_serialization=True)
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
               {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}]
    (folder / "modules.json").write_text(json.dumps(modules))
    (folder / "1_Pooling").mkdir(exist_ok=True)
    (folder / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_mean_tokens": True}))
    return folder


def measure(folder: Path, batch: list[str], threads: int, rounds: int) -> dict:
    from edge_infer.runtime.embed import load_embedding

    model = load_embedding(folder, threads=threads)
    model.embed(batch)  # warm-up: kernels chosen, buffers allocated
    load_before = os.getloadavg()[0]
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        model.embed(batch)
        times.append(time.perf_counter() - start)
    return {"threads": threads, "best_per_s": len(batch) / min(times),
            "median_per_s": len(batch) / statistics.median(times), "load_before": load_before,
            "load_after": os.getloadavg()[0]}


def against_optimum(src: Path, ours_folder: Path, batch: list[str], rounds: int, work: Path) -> dict:
    """Our fp32 encoder graph against optimum-onnx's feature-extraction graph of the same weights: the same
    padded batches to both raw sessions (1 thread), alternating which goes first each round."""
    import numpy as np
    import onnx

    from edge_infer.contract.io_names import ATTENTION_MASK, INPUT_IDS, LAST_HIDDEN_STATE, TOKEN_TYPE_IDS
    from edge_infer.devices.ort import ort
    from edge_infer.export import embed_optimum
    from edge_infer.export.progress import Progress
    from edge_infer.runtime.embed import _batches, load_embedding

    ours = load_embedding(ours_folder, threads=1)
    path = work / "optimum" / "model.onnx"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        onnx.save_model(embed_optimum.export_graph(src, Progress(quiet=True)), str(path), save_as_external_data=True,
                        location="model.onnx.data")
    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = 1, 1
    theirs = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    ids = ours.tokenize(batch)
    feeds = []
    for group in _batches(ids):  # the batches edge_infer's runtime makes
        width = max(len(ids[i]) for i in group)
        x, m = np.zeros((len(group), width), np.int64), np.zeros((len(group), width), np.int64)
        for r, i in enumerate(group):
            x[r, : len(ids[i])], m[r, : len(ids[i])] = ids[i], 1
        feeds.append({INPUT_IDS: x, ATTENTION_MASK: m})
    extra = {i.name for i in theirs.get_inputs()} - {INPUT_IDS, ATTENTION_MASK}
    runs = {"edge-infer": lambda f: ours.session.run([LAST_HIDDEN_STATE], f),
            "optimum": lambda f: theirs.run([LAST_HIDDEN_STATE], {**f, **{n: np.zeros_like(f[INPUT_IDS])
                                                                          for n in extra if n == TOKEN_TYPE_IDS}})}
    times: dict[str, list[float]] = {name: [] for name in runs}
    for r in range(rounds + 1):  # round 0 warms both up
        for name in (list(runs) if r % 2 else list(runs)[::-1]):
            start = time.perf_counter()
            for f in feeds:
                runs[name](f)
            if r:
                times[name].append(time.perf_counter() - start)
    return {name: {"best_per_s": len(batch) / min(t), "median_per_s": len(batch) / statistics.median(t)}
            for name, t in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/ei-embed-bench"), help="source and export folders")
    ap.add_argument("--quants", default="fp32,int8")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--texts", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--json", type=Path, help="write the rows here as JSON")
    ap.add_argument("--against-optimum", action="store_true",
                    help="also time optimum-onnx's feature-extraction graph of the same fp32 weights (1 thread)")
    args = ap.parse_args()

    from edge_infer.export.export_folder import ExportOptions, export_model

    src = args.work / "minilm-shaped"
    if not (src / "config.json").is_file():
        make_source(src)
    batch = texts(args.texts)
    rows = []
    for quant in args.quants.split(","):
        out = args.work / f"export-{quant}"
        if not (out / "manifest.json").is_file():
            export_model(src, out, ExportOptions(quant=quant, force=True))
        from edge_infer.runtime.embed import load_embedding

        lengths = [len(i) for i in load_embedding(out).tokenize(batch)]
        for t in (int(x) for x in args.threads.split(",")):
            row = {"quant": quant, "texts": len(batch), "mean_tokens": sum(lengths) / len(lengths),
                   "max_tokens": max(lengths), **measure(out, batch, t, args.rounds)}
            rows.append(row)
            print(f"{quant:5} threads {t}: {row['best_per_s']:7.1f} embeddings/s best, {row['median_per_s']:7.1f} "
                  f"median ({len(batch)} texts, mean {row['mean_tokens']:.0f} tokens; load average "
                  f"{row['load_before']:.2f} -> {row['load_after']:.2f})", flush=True)
    if args.against_optimum:
        side = against_optimum(src, args.work / "export-fp32", batch, args.rounds, args.work)
        for name, r in side.items():
            print(f"fp32 graph of {name:10}: {r['best_per_s']:7.1f} embeddings/s best, {r['median_per_s']:7.1f} median "
                  "(1 thread, alternating)", flush=True)
        rows.append({"against_optimum": side, "load_after": os.getloadavg()[0]})
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
