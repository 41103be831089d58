"""Which onnxruntime builds are installed, and whether two of them collide.

onnxruntime, onnxruntime-gpu, onnxruntime-directml and onnxruntime-openvino are separate
distributions of one `onnxruntime` import package. Two of them in one site-packages folder write
the same files: the one installed last overwrites parts of the other, uninstalling either deletes
files the other needs, and the import is a mix of two builds (a GPU provider silently missing, or
a crash at load). Two in different folders are fine: the first folder on sys.path wins (how
`make npu-venv` puts onnxruntime-openvino in front of .venv's onnxruntime). `edge-infer devices`
reports both cases; README "GPU" says what to install for each machine.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

# What to install per machine (README "GPU"); each replaces the plain onnxruntime wheel.
BUILDS = {
    "onnxruntime": "CPU (and CoreML on macOS): the default",
    "onnxruntime-gpu": "NVIDIA GPUs (CUDA 12, cuDNN 9), Linux and Windows",
    "onnxruntime-directml": "any DirectX 12 GPU on Windows",
    "onnxruntime-openvino": "Intel CPUs, GPUs and NPUs",
}


@dataclass(frozen=True)
class OrtInstall:
    """One installed distribution that provides the `onnxruntime` import package."""

    name: str  # "onnxruntime-gpu"
    version: str
    folder: Path  # the site-packages folder it is installed in

    def __str__(self) -> str:
        return f"{self.name} {self.version}"


def onnxruntime_installs(path: Sequence[str] | None = None) -> list[OrtInstall]:
    """Every distribution on `path` (sys.path when None) whose files include `onnxruntime/__init__.py`,
    in sys.path order. Plugins with a package of their own (onnxruntime-qnn 2.x) are not builds."""
    from importlib.metadata import distributions

    found, seen = [], set()
    for dist in (distributions(path=list(path)) if path is not None else distributions()):
        name = (dist.metadata["Name"] or "").lower().replace("_", "-")
        if not (name.startswith("onnxruntime") or name.startswith("ort-nightly")):
            continue
        if not any(str(f).replace("\\", "/") == "onnxruntime/__init__.py" for f in dist.files or ()):
            continue
        folder = Path(str(dist.locate_file(""))).resolve()
        if (name, folder) not in seen:
            seen.add((name, folder))
            found.append(OrtInstall(name, dist.version, folder))
    return found


def collision(installs: Iterable[OrtInstall]) -> str | None:
    """The problem and its fix when two onnxruntime builds share one folder, else None."""
    by_folder: dict[Path, list[OrtInstall]] = {}
    for i in installs:
        by_folder.setdefault(i.folder, []).append(i)
    clash = next((group for group in by_folder.values() if len(group) > 1), None)
    if clash is None:
        return None
    clash = sorted(clash, key=lambda i: i.name)
    names = " ".join(i.name for i in clash)
    return (f"{len(clash)} onnxruntime builds are installed in {clash[0].folder}: "
            f"{', '.join(str(i) for i in clash)}. They are one `onnxruntime` package, so their files overwrite each "
            f"other and the import is a mix of builds. Fix: `pip uninstall -y {names}`, then install exactly one: "
            + "; ".join(f"{n} for {what}" for n, what in BUILDS.items()) + " (README \"GPU\")")


def describe_installs(installs: Sequence[OrtInstall], imported: Path | None) -> list[str]:
    """Lines for `edge-infer devices`: the build that is imported (`imported`: the resolved path of the
    imported onnxruntime/__init__.py), and any shadowed in other folders."""
    if not installs:
        return ["onnxruntime: no installed distribution found (a source build?)"]
    lines = []
    for i in installs:
        own = (i.folder / "onnxruntime" / "__init__.py").resolve()
        lines.append(f"onnxruntime build: {i} in {i.folder} ({'imported' if own == imported else 'shadowed'})")
    return lines


def imported_init() -> Path | None:
    """The resolved path of the imported onnxruntime's __init__.py."""
    from edge_infer.devices.ort import ort

    file = getattr(ort, "__file__", None)
    return Path(file).resolve() if file else None
