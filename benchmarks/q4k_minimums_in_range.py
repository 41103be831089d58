"""Make a synthetic Q4_K GGUF's block minimums lie inside their blocks' ranges, as a real file's do.

    .venv/bin/python benchmarks/q4k_minimums_in_range.py FILE.gguf   # edits FILE in place

benchmarks/big_model.py --qwen2-1.5b writes Q4_K blocks of random bytes: their minimums often fall
outside the block's range (zero points past 15), which the folded GGUF import refuses (such weights
keep the exact branch), so the file cannot show what the folded import does at 1.5B. This rewrites
each Q4_K block's 6-bit sub-block scales (at least 8) and minimums (m * dmin <= 0.9 * 15 * sc * d),
leaving d, dmin and the 4-bit values as they are. Speed only: the weights stay random.
"""

from __future__ import annotations

import argparse

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("gguf", help="the file to edit in place")
    path = ap.parse_args().gguf
    import gguf
    from gguf.constants import GGMLQuantizationType as QT

    r = gguf.GGUFReader(path, "r+")
    n = 0
    for t in r.tensors:
        if t.tensor_type != QT.Q4_K:
            continue
        blocks = t.data.reshape(-1, 144)  # memmap view, writable
        d = blocks[:, 0:2].copy().view(np.float16).astype(np.float32)[:, 0]
        dmin = blocks[:, 2:4].copy().view(np.float16).astype(np.float32)[:, 0]
        s = blocks[:, 4:16].astype(np.int32)
        sc = np.zeros((len(s), 8), np.int32); m = np.zeros((len(s), 8), np.int32)
        sc[:, :4] = s[:, 0:4] & 63; m[:, :4] = s[:, 4:8] & 63
        sc[:, 4:] = (s[:, 8:12] & 0xF) | ((s[:, 0:4] >> 6) << 4)
        m[:, 4:] = (s[:, 8:12] >> 4) | ((s[:, 4:8] >> 6) << 4)
        sc = np.maximum(sc, 8)  # sub-block scales of a real file are rarely tiny
        # a real block's minimum lies inside its range: m * dmin <= 15 * sc * d (zero point in [0, 15])
        lim = np.floor(15 * sc * d[:, None] / np.maximum(dmin[:, None], 1e-12) * 0.9).astype(np.int64)
        m = np.minimum(m, np.clip(lim, 0, 63)).astype(np.int32)
        out = np.zeros_like(s)
        out[:, 0:4] = (sc[:, :4] & 63) | ((sc[:, 4:] >> 4) << 6)
        out[:, 4:8] = (m[:, :4] & 63) | ((m[:, 4:] >> 4) << 6)
        out[:, 8:12] = (sc[:, 4:] & 0xF) | ((m[:, 4:] & 0xF) << 4)
        blocks[:, 4:16] = out.astype(np.uint8)
        n += 1
    print("patched", n, "Q4_K tensors")


if __name__ == "__main__":
    main()
