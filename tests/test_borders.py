"""Package borders run one way (STYLE.md): a lower room never imports a higher or a sibling one.

    contract -> (nothing of ours: errors, the model folder's names and manifest envelope, the graph's
                 I/O names, the quantization record)
    devices  -> contract
    runtime  -> devices, contract
    quantize -> contract
    export   -> quantize, runtime (validation), devices, contract
    bench    -> runtime, devices, contract (the benchmark harness and its text)
    serve    -> runtime, bench, devices, contract
    edge_infer (front door, CLI) -> anything

Read from the source (every `import` / `from ... import`, at any depth, including imports inside
functions), so a new wrong-way edge fails here. Each folder lists what it may import; anything
else of ours is refused, the front door (`import edge_infer`, `edge_infer.cli`) included. KNOWN
would list edges tolerated for a while (it may only shrink: an edge that is gone must leave it
too); it is empty.

The graph's I/O names are spelled once, in contract/io_names.py: a string literal equal to one
of them (or starting like a KV name) anywhere else in the package fails the second test below.
"""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ALLOWED = {
    "contract": set(),
    "devices": {"contract"},
    "runtime": {"devices", "contract"},
    "quantize": {"contract"},
    "export": {"quantize", "runtime", "devices", "contract"},
    "bench": {"runtime", "devices", "contract"},
    "serve": {"runtime", "bench", "devices", "contract"},
}
FRONT_DOOR = "edge_infer"  # the public API and the CLI: importable by nobody below it
# (file, imported module) pairs that point the wrong way today: debt, not permission.
KNOWN: set[tuple[str, str]] = set()


def _imported(path: Path, root: Path) -> list[str]:
    """Every module of ours `path` imports, as `edge_infer.<folder>...` (or `edge_infer` itself)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    depth = len(path.relative_to(root).parts) - 1  # a folder's own files: `from .x` stays inside
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            module = node.module or ""
            # `from edge_infer import cli` names a module of the front door the same as `import edge_infer.cli`
            out += [f"{module}.{a.name}" for a in node.names] if module == FRONT_DOOR else [module]
        elif isinstance(node, ast.ImportFrom) and node.level > depth:  # `from ..x import`: out of the folder
            out.append(FRONT_DOOR + ("." + node.module if node.module else ""))
    return [name for name in out if name.split(".")[0] == FRONT_DOOR]


def wrong_way_edges(root: Path = ROOT) -> set[tuple[str, str]]:
    found = set()
    for folder, allowed in ALLOWED.items():
        for path in sorted((root / folder).rglob("*.py")):
            for name in _imported(path, root):
                parts = name.split(".")
                target = parts[1] if len(parts) > 1 else FRONT_DOOR
                if target != folder and target not in allowed:
                    found.add((path.relative_to(root).as_posix(), ".".join(parts[:3])))
    return found


def test_no_new_wrong_way_imports():
    new = wrong_way_edges() - KNOWN
    assert not new, "imports that cross a package border the wrong way (see STYLE.md): " + ", ".join(
        f"{f} -> {m}" for f, m in sorted(new))


def test_known_debt_only_shrinks():
    gone = KNOWN - wrong_way_edges()
    assert not gone, "these wrong-way imports are gone: remove them from KNOWN: " + ", ".join(
        f"{f} -> {m}" for f, m in sorted(gone))


def test_every_folder_is_bordered():
    """A new top-level package folder must say what it may import."""
    packages = {p.parent.name for p in ROOT.glob("*/__init__.py")} - {FRONT_DOOR, "tests"}
    assert packages <= set(ALLOWED), f"add {sorted(packages - set(ALLOWED))} to ALLOWED"


def test_the_border_test_sees_a_wrong_edge(tmp_path):
    """The reader finds an edge at any depth, relative imports and the front door included."""
    (tmp_path / "devices").mkdir()
    (tmp_path / "devices" / "sample.py").write_text(
        "from . import ort\nfrom edge_infer.contract.errors import UserError\n"
        "def f():\n    from edge_infer.runtime import model\n    import edge_infer\n"
        "from ..serve import app\nfrom edge_infer import cli\n", encoding="utf-8")
    got = {m for _, m in wrong_way_edges(tmp_path)}
    assert got == {"edge_infer.runtime", "edge_infer", "edge_infer.serve", "edge_infer.cli"}


IO_NAMES = {"input_ids", "attention_mask", "position_ids", "logits_to_keep", "query_seqlens", "logits"}
KV_PREFIXES = ("past_key_values.", "present.")


def _io_literals(path: Path) -> list[tuple[int, str]]:
    """String literals in `path` that spell a graph I/O name (docstrings and dict keys aside: a
    docstring may describe the graph, and onnxruntime-genai's config has keys of the same names)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    skip = set()
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
            skip.add(id(body[0].value))
        if isinstance(node, ast.Dict):
            skip.update(id(k) for k in node.keys if k is not None)
    return [(node.lineno, node.value) for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in skip
            and (node.value in IO_NAMES or node.value.startswith(KV_PREFIXES))]


def test_io_names_are_spelled_once():
    found = []
    for folder in ALLOWED.keys() - {"contract"} | {FRONT_DOOR}:
        for path in sorted((ROOT / folder).rglob("*.py")):
            found += [f"{path.relative_to(ROOT).as_posix()}:{line} {text!r}" for line, text in _io_literals(path)]
    assert not found, "graph I/O names belong in contract/io_names.py; import them from there: " + ", ".join(found)
