"""No function in the package is 80 lines or longer (scripts/function_length.py)."""

import importlib.util
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "function_length.py"


def _script():
    spec = importlib.util.spec_from_file_location("function_length", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_no_function_in_the_package_is_80_lines_or_longer():
    found = _script().long_functions()
    assert found == [], "\n".join(f"{p}:{line} {name} {n} lines" for p, line, name, n in found)


def test_the_check_finds_a_long_function(tmp_path):
    """The check can fail: an 80-line function in a folder is reported, a 79-line one is not."""
    (tmp_path / "pkg").mkdir()
    body = "\n".join(f"    x{i} = {i}" for i in range(78))
    (tmp_path / "pkg" / "m.py").write_text(f"def long():\n{body}\n    return 0\n\n\n"
                                           f"def short():\n{body[:body.rindex(chr(10))]}\n    return 1\n")
    found = _script().long_functions(("pkg",), 80, tmp_path)
    assert [(p, name, n) for p, _, name, n in found] == [("pkg/m.py", "long", 80)]
