"""The type gate (.ci/run, `make typecheck`): mypy over every package folder, each checked as the
`edge_infer.*` package it installs as.

The top-level folders (contract/, runtime/, export/, ...) install as subpackages of `edge_infer`
through setuptools' package-dir mapping in pyproject.toml, a mapping mypy cannot follow: run on the
folders themselves, an import between them would be checked as Any. This script lays the package
out as it installs, build/typecheck/edge_infer/ holding a link to each folder named by that mapping,
runs mypy on the package there, and names the folders' own paths in what mypy reports.

    python scripts/typecheck.py [mypy options]
"""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TREE = ROOT / "build" / "typecheck"
PACKAGE = "edge_infer"


def package_dirs() -> dict[str, str]:
    """edge_infer's direct subpackages -> their folders, from pyproject.toml's package-dir."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    mapping = config["tool"]["setuptools"]["package-dir"]
    out = {}
    for name, folder in mapping.items():
        parts = name.split(".")
        if len(parts) == 2 and parts[0] == PACKAGE:  # nested ones (export.arch) come with their parent
            out[parts[1]] = folder
    return out


def lay_out() -> dict[str, str]:
    """build/typecheck/edge_infer/: the package's own files, and a link per folder; returns the
    reported path prefix -> the real one."""
    top = TREE / PACKAGE
    top.mkdir(parents=True, exist_ok=True)
    wanted = {p.name: p for p in (ROOT / PACKAGE).iterdir() if p.suffix in (".py", ".pyi")}
    wanted.update({sub: ROOT / folder for sub, folder in package_dirs().items()})
    for entry in top.iterdir():
        if entry.name not in wanted or not entry.is_symlink() or entry.resolve() != wanted[entry.name].resolve():
            entry.unlink() if entry.is_symlink() or entry.is_file() else None
    for name, target in wanted.items():
        link = top / name
        if not link.is_symlink():
            link.symlink_to(target)
    shown = os.path.relpath(top, ROOT) + "/"
    prefixes = {f"{shown}{sub}/": f"{folder}/" for sub, folder in package_dirs().items()}
    prefixes[shown] = f"{PACKAGE}/"
    return prefixes


def main(argv: list[str]) -> int:
    prefixes = lay_out()
    env = {**os.environ, "MYPYPATH": str(TREE)}
    run = subprocess.run([sys.executable, "-m", "mypy", "-p", PACKAGE, *argv], cwd=ROOT, env=env,
                         capture_output=True, text=True)
    for stream, text in ((sys.stdout, run.stdout), (sys.stderr, run.stderr)):
        for line in text.splitlines(keepends=True):
            for shown, real in prefixes.items():  # longest first: a folder before the package itself
                if line.startswith(shown):
                    line = real + line[len(shown):]
                    break
            stream.write(line)
    return run.returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
