"""Add sha256 hashes to requirements.lock, for `pip install --require-hashes`.

    python scripts/hash_lock.py            # rewrites requirements.lock in place

Downloads exactly the files pip would install here (same indexes, same platform) into a temporary
folder and records each file's hash after its pin. Rerun after changing a pin.
"""

from __future__ import annotations

import hashlib
import re
import subprocess
import sys
import tempfile
from pathlib import Path

LOCK = Path(__file__).resolve().parent.parent / "requirements.lock"


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def main() -> None:
    lines = LOCK.read_text().splitlines()
    pins = [ln.split("--hash")[0].strip().rstrip("\\").strip() for ln in lines if ln.strip() and not ln.startswith("#")]
    comments = [ln for ln in lines if ln.startswith("#")]
    with tempfile.TemporaryDirectory() as tmp:
        reqs = Path(tmp) / "pins.txt"
        reqs.write_text("\n".join(pins) + "\n")
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-r", str(reqs), "-d", tmp + "/d"],
                       check=True)
        hashes: dict[str, list[str]] = {}
        for f in sorted(Path(tmp, "d").iterdir()):
            name = canonical(re.split(r"-\d", f.name, maxsplit=1)[0])
            hashes.setdefault(name, []).append(hashlib.sha256(f.read_bytes()).hexdigest())
    out = list(comments)
    for pin in pins:
        name = canonical(re.split(r"[=<>!~\[]", pin, maxsplit=1)[0])
        found = hashes.get(name)
        if not found:
            raise SystemExit(f"no downloaded file for {pin}")
        out.append(pin + " " + " ".join(f"--hash=sha256:{h}" for h in found))
    LOCK.write_text("\n".join(out) + "\n")
    print(f"{len(pins)} pins hashed")


if __name__ == "__main__":
    main()
