"""The benchmark scripts stay runnable: nothing imports them, so a rename elsewhere would rot them unseen.

Each script under benchmarks/ (and one folder down) is checked two ways:
  * run: `--help` in a subprocess for the argparse scripts (parses the arguments, so the top-level
    imports run), an import under another name than __main__ for the modules the scripts share;
  * read: every import in the file, inside functions too (most scripts import edge-infer only after
    parsing their arguments, where `--help` never gets): edge_infer modules and names exist, sibling
    scripts define the names taken from them, other packages are installed (or live in the named venv).
The subprocesses run in parallel; the whole file takes a few seconds.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
SCRIPTS = sorted([*BENCH.glob("*.py"), *BENCH.glob("*/*.py")])
# Packages a script imports that live in another environment than .venv, and where.
ELSEWHERE = {"onnxruntime_genai": ".venv-genai (make test-genai) or the genai peer's (benchmarks/peers.py setup)",
             "llama_cpp": "the llama.cpp peer's venv (benchmarks/peers.py setup)"}
# Modules that read sys.argv when imported (atheris targets): the arguments to import them with.
IMPORT_ARGV = {"fuzz/target.py": ["gguf", "{tmp}"]}
IMPORT_CHECK = """
import runpy, sys
path, argv = sys.argv[1], sys.argv[2:]
sys.path.insert(0, path.rsplit("/", 1)[0])  # as when run: the script's folder first
sys.argv = [path, *argv]
names = runpy.run_path(path, run_name="benchmark_import_check")
scratch = names.get("SCRATCH")  # fuzz/target.py's input file
if scratch is not None:
    scratch.unlink(missing_ok=True)
"""


def rel(path: Path) -> str:
    return path.relative_to(BENCH).as_posix()


def is_cli(tree: ast.Module) -> bool:
    source_names = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    return "__name__" in source_names and "argparse" in imported


def command(path: Path, tmp: Path) -> list[str]:
    if is_cli(ast.parse(path.read_text())):
        return [sys.executable, str(path), "--help"]
    argv = [a.format(tmp=tmp) for a in IMPORT_ARGV.get(rel(path), [])]
    return [sys.executable, "-c", IMPORT_CHECK, str(path), *argv]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, subprocess.CompletedProcess]:
    tmp = tmp_path_factory.mktemp("bench-import")

    def run(path: Path) -> subprocess.CompletedProcess:
        return subprocess.run(command(path, tmp), capture_output=True, text=True, timeout=300, cwd=ROOT)

    with ThreadPoolExecutor(max_workers=4) as pool:
        return dict(zip([rel(p) for p in SCRIPTS], pool.map(run, SCRIPTS)))


def test_every_script_is_found():
    assert len(SCRIPTS) >= 20 and "pad_ab.py" in {rel(p) for p in SCRIPTS}


@pytest.mark.parametrize("script", SCRIPTS, ids=rel)
def test_script_runs_its_help_or_imports(script, runs):
    result = runs[rel(script)]
    assert result.returncode == 0, f"{' '.join(result.args[:3])}...\n{result.stderr[-3000:]}"
    if result.args[-1] == "--help":
        assert "usage:" in result.stdout


def top_level_names(path: Path) -> set[str]:
    names = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names |= {n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)}
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names |= {(a.asname or a.name).split(".")[0] for a in node.names}
    return names


def imports(path: Path) -> list[tuple[int, str, list[str]]]:
    """(line, module, names taken from it) for every absolute import in the file, nested ones too."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name, []) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module, [a.name for a in node.names]))
    return found


def unresolved(path: Path, module: str, names: list[str]) -> str | None:
    """Why `from module import names` (or `import module`) would fail when the script runs, or None."""
    top = module.split(".")[0]
    # another script: beside it, in benchmarks/, or in a folder of benchmarks/ the script puts on sys.path
    siblings = [f for f in (path.parent / f"{top}.py", BENCH / f"{top}.py", *BENCH.glob(f"*/{top}.py")) if f.is_file()]
    if siblings:
        if any(set(names) <= top_level_names(f) for f in siblings):
            return None
        return f"none of {[rel(f) for f in siblings]} defines all of {names}"
    if top == "edge_infer":
        try:
            mod = importlib.import_module(module)
        except ImportError as e:
            return f"no module {module} ({e})"
        missing = [n for n in names if not hasattr(mod, n) and importlib.util.find_spec(f"{module}.{n}") is None]
        return f"{module} has no {missing}" if missing else None
    if top in ELSEWHERE or top == "__future__":
        return None
    return None if importlib.util.find_spec(top) is not None else f"{top} is not installed in .venv"


@pytest.mark.parametrize("script", SCRIPTS, ids=rel)
def test_every_import_in_the_script_resolves(script):
    problems = [f"line {line}: {why}" for line, module, names in imports(script)
                if (why := unresolved(script, module, names)) is not None]
    assert problems == []


def test_the_code_set_edits_real_standard_library_functions(monkeypatch):
    """benchmarks/speculative/tasks.json "code" (issue 19's code-editing check): each task's prompt is its
    instruction and the source of a standard-library function, read from this interpreter."""
    spec = importlib.util.spec_from_file_location("speculative_run", BENCH / "speculative" / "run.py")
    run = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, run)  # its dataclasses look their module up there
    spec.loader.exec_module(run)
    tasks = run.load_tasks("code")
    assert len(tasks) == 4
    for name, messages in tasks:
        instruction, source = messages[0]["content"].split("\n\n", 1)
        assert instruction.startswith("Add type hints"), name
        assert source.startswith(f"def {name.removeprefix('hints-')}("), name
        compile(source, name, "exec")  # the whole function
