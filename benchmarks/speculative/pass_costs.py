"""Cost of one verification pass by width for any edge-infer model (run.py's pass_costs, alone).

    .venv/bin/python benchmarks/speculative/pass_costs.py MODEL [--widths 1,2,4,8] [--reps 8] [--threads 2]

Prints {width: [min ms, median ms]} of one forward pass over `width` new tokens after 300 cached
ones, widths interleaved in random order each repetition.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--widths", default="1,2,4,8")
    ap.add_argument("--reps", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    import edge_infer
    from run import pass_costs

    m = edge_infer.load(args.model, device="cpu", threads=args.threads)
    costs = pass_costs(m, widths=tuple(int(w) for w in args.widths.split(",")), reps=args.reps)
    print(json.dumps({w: [round(lo * 1e3, 1), round(med * 1e3, 1)] for w, (lo, med) in costs.items()}))


if __name__ == "__main__":
    main()
