"""Package borders run one way (STYLE.md): a lower room never imports a higher or a sibling one.

    contract -> (nothing of ours: the errors every folder raises)
    devices  -> contract
    runtime  -> devices, contract
    quantize -> contract
    export   -> quantize, runtime (validation), devices
    serve    -> runtime, devices
    edge_infer (front door, CLI) -> anything

Read from the source (every `import` / `from ... import`, at any depth, including imports inside
functions), so a new wrong-way edge fails here. KNOWN would list edges tolerated for a while (it
may only shrink: an edge that is gone must leave it too); it is empty.
"""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = {
    "contract": {"devices", "runtime", "export", "quantize", "serve"},
    "devices": {"runtime", "export", "quantize", "serve"},
    "runtime": {"export", "quantize", "serve"},
    "quantize": {"export", "runtime", "serve"},
    "export": {"serve"},
    "serve": {"export", "quantize"},
}
# (file, imported module) pairs that point the wrong way today: debt, not permission.
KNOWN: set[tuple[str, str]] = set()


def wrong_way_edges() -> set[tuple[str, str]]:
    found = set()
    for folder, banned in FORBIDDEN.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            tree = ast.parse(path.read_text(encoding="utf-8"))
            for node in ast.walk(tree):
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0:
                    names = [node.module or ""]
                elif isinstance(node, ast.ImportFrom) and node.level > len(path.relative_to(ROOT).parts) - 1:
                    names = ["edge_infer." + (node.module or "")]  # `from ..x import`: out of the folder
                else:
                    continue
                for name in names:
                    parts = name.split(".")
                    if parts[0] == "edge_infer" and len(parts) > 1 and parts[1] in banned:
                        found.add((path.relative_to(ROOT).as_posix(), ".".join(parts[:3])))
    return found


def test_no_new_wrong_way_imports():
    new = wrong_way_edges() - KNOWN
    assert not new, "imports that cross a package border the wrong way (see STYLE.md): " + ", ".join(
        f"{f} -> {m}" for f, m in sorted(new))


def test_known_debt_only_shrinks():
    gone = KNOWN - wrong_way_edges()
    assert not gone, "these wrong-way imports are gone: remove them from KNOWN: " + ", ".join(
        f"{f} -> {m}" for f, m in sorted(gone))
