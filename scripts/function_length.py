"""Functions of 80 lines or more in the package folders (STYLE.md: functions under 80 lines).

    python scripts/function_length.py [--limit 80] [FOLDER ...]

Prints one line per offender (path:line name length) and exits 1 when there is any.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE_FOLDERS = ("edge_infer", "export", "runtime", "quantize", "devices", "serve", "contract", "bench")


def long_functions(folders=PACKAGE_FOLDERS, limit: int = 80, root: Path = ROOT) -> list[tuple[str, int, str, int]]:
    """(path, line, name, length in lines) of every function or method `limit` lines long or longer,
    counted from its `def` line to its last line (decorators, such as a command's click options, are
    declarations around the function, not its body)."""
    out = []
    for folder in folders:
        for path in sorted((root / folder).rglob("*.py")):
            tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
            for node in ast.walk(tree):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    length = (node.end_lineno or node.lineno) - node.lineno + 1
                    if length >= limit:
                        out.append((str(path.relative_to(root)), node.lineno, node.name, length))
    return out


def main(argv: list[str]) -> int:
    limit = 80
    if argv[:1] == ["--limit"]:
        limit, argv = int(argv[1]), argv[2:]
    found = long_functions(tuple(argv) or PACKAGE_FOLDERS, limit)
    for path, line, name, length in found:
        print(f"{path}:{line} {name} {length} lines")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
