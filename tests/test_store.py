"""The model store (contract/model_store.py, export/store/): names, export/list/show/cp/rm, pack and
import with every hash checked, and pull from a local Hugging Face hub cache (offline)."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import tarfile
from pathlib import Path

import pytest
from click.testing import CliRunner

from edge_infer.cli import main
from edge_infer.contract.errors import UserError
from edge_infer.contract.model_store import folder_of, parse_name, stored_names


@pytest.fixture
def home(tmp_path, monkeypatch):
    """A fresh, empty store for the test."""
    h = tmp_path / "home"
    monkeypatch.setenv("EDGE_INFER_HOME", str(h))
    return h


def cli(*args: str, ok: bool = True):
    result = CliRunner().invoke(main, [str(a) for a in args])
    if ok:
        assert result.exit_code == 0, (result.output, result.exception)
    return result


def files_under(path: Path) -> list[Path]:
    return [p for p in path.rglob("*") if p.is_file()] if path.exists() else []


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """Two tiny random checkpoints of different families."""
    from tiny import make_checkpoint

    root = tmp_path_factory.mktemp("store-src")
    return {"llama": make_checkpoint("llama", root / "llama"), "qwen2": make_checkpoint("qwen2", root / "qwen2", seed=1)}


@pytest.fixture(scope="module")
def built_store(tmp_path_factory, sources):
    """The issue's first steps: export two models by name (once; each test gets a copy of the store)."""
    home = tmp_path_factory.mktemp("built-store")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("EDGE_INFER_HOME", str(home))
        cli("export", sources["llama"], "--name", "tiny-llama", "--quant", "int4", "--max-length", "64", "-q")
        cli("export", sources["qwen2"], "--name", "tiny-qwen:fp32", "--quant", "fp32", "--max-length", "32", "-q")
    return home


@pytest.fixture
def two_models(home, built_store):
    shutil.copytree(built_store, home)
    return home


@pytest.mark.parametrize("bad", ["../x", "a/b", "A", "", ":x", "x:", "x:y:z", ".hidden", "con", "x.", "x" * 65,
                                 "a b", "x:..", "nul:latest"])
def test_names_that_are_not_safe_path_parts_are_refused(bad):
    with pytest.raises(UserError, match="not a valid model name"):
        parse_name(bad)


def test_name_and_tag():
    assert str(parse_name("smol")) == "smol:latest"
    assert parse_name("smol:q4_1").tag == "q4_1"


def test_export_by_name_list_show_and_load(two_models, sources):
    import edge_infer
    from edge_infer.runtime.manifest import load_manifest

    assert [str(n) for n in stored_names()] == ["tiny-llama:latest", "tiny-qwen:fp32"]
    rows = [json.loads(line) for line in cli("list", "--json").stdout.splitlines()]
    for row in rows:  # every figure is the manifest's own
        m = load_manifest(row["folder"], verify=True)
        size = sum(f["size"] for f in m.files.values()) + (m.folder / "manifest.json").stat().st_size
        assert (row["architecture"], row["quantization"], row["size_bytes"], row["kv_bytes"]) == (
            m.geometry.architecture, m.quant_scheme, size, m.kv_bytes())
    assert [(r["name"], r["architecture"], r["quantization"]) for r in rows] == [
        ("tiny-llama:latest", "llama", "int4"), ("tiny-qwen:fp32", "qwen2", "fp32")]
    assert rows[0]["kv_bytes"] == 2 * rows[1]["kv_bytes"]  # max_length 64 against 32, same geometry
    table = cli("list").stdout
    assert "tiny-llama:latest" in table and "tiny-qwen:fp32" in table and "KV/SEQ" in table
    shown = cli("show", "tiny-qwen:fp32").stdout
    assert str(folder_of("tiny-qwen:fp32")) in shown and "all sha256 verified" in shown

    by_name, by_path = edge_infer.load("tiny-llama"), edge_infer.load(folder_of("tiny-llama"))
    assert by_name.manifest.folder == folder_of("tiny-llama")
    prompt = "The quick brown fox"
    assert edge_infer.generate(by_name, prompt, max_tokens=8) == edge_infer.generate(by_path, prompt, max_tokens=8)
    out = cli("run", "tiny-llama", prompt, "--raw", "--max-tokens", "8", "--no-stats").stdout
    assert out.strip() == edge_infer.generate(by_path, prompt, max_tokens=8).strip()


def test_a_path_that_exists_wins_over_a_stored_name(two_models, tmp_path, monkeypatch):
    import edge_infer

    shutil.copytree(folder_of("tiny-qwen:fp32"), tmp_path / "cwd" / "tiny-llama")
    monkeypatch.chdir(tmp_path / "cwd")
    assert edge_infer.load("tiny-llama").manifest.geometry.architecture == "qwen2"  # the folder, not the store


def test_an_unknown_name_lists_close_names(two_models):
    result = cli("run", "tiny-lama", "hi", ok=False)
    assert result.exit_code == 2 and "tiny-lama" in result.stderr
    assert "did you mean tiny-llama:latest" in result.stderr
    result = cli("show", "zzz", ok=False)
    assert result.exit_code == 2 and "edge-infer list" in result.stderr


def test_cp_and_rm(two_models):
    cli("cp", "tiny-llama", "copy:v2")
    src, dst = folder_of("tiny-llama"), folder_of("copy:v2")
    assert sorted(p.name for p in files_under(dst)) == sorted(p.name for p in files_under(src))
    assert all(p.read_bytes() == (src / p.relative_to(dst)).read_bytes() for p in files_under(dst))
    assert cli("cp", "tiny-llama", "copy:v2", ok=False).exit_code == 2  # no silent overwrite
    cli("rm", "tiny-llama")
    assert [str(n) for n in stored_names()] == ["copy:v2", "tiny-qwen:fp32"]
    assert not (two_models / "models" / "tiny-llama").exists()  # the name's folder goes with its last tag
    assert "did you mean" in cli("rm", "tiny-llama", ok=False).stderr


def test_export_needs_exactly_one_destination(home, sources):
    assert "-o FOLDER, or --name NAME" in cli("export", sources["llama"], ok=False).stderr
    assert "not both" in cli("export", sources["llama"], "-o", home / "x", "--name", "x", ok=False).stderr


def test_pack_on_one_store_import_into_another(two_models, tmp_path, monkeypatch):
    import edge_infer

    archive = tmp_path / "carry" / "llama.tar"
    archive.parent.mkdir()
    cli("pack", "tiny-llama", archive)
    original = {p.relative_to(folder_of("tiny-llama")).as_posix(): p.read_bytes()
                for p in files_under(folder_of("tiny-llama"))}
    expected = edge_infer.generate(edge_infer.load("tiny-llama"), "Paris is", max_tokens=6)

    monkeypatch.setenv("EDGE_INFER_HOME", str(tmp_path / "offline-machine"))
    assert stored_names() == []
    assert "every file's sha256 verified" in cli("import", archive).stderr
    assert [str(n) for n in stored_names()] == ["tiny-llama:latest"]
    copied = {p.relative_to(folder_of("tiny-llama")).as_posix(): p.read_bytes()
              for p in files_under(folder_of("tiny-llama"))}
    assert copied == original
    assert edge_infer.generate(edge_infer.load("tiny-llama"), "Paris is", max_tokens=6) == expected
    cli("import", archive, "--name", "again:v1")  # under another name
    assert cli("import", archive, ok=False).exit_code == 2  # already there: no silent overwrite
    cli("import", folder_of("again:v1"), "--name", "from-folder")  # a folder imports the same way
    assert [str(n) for n in stored_names()] == ["again:v1", "from-folder:latest", "tiny-llama:latest"]


def _rewrite(src: Path, dst: Path, edit) -> None:
    """Copy a tar archive member by member, letting `edit(info, data)` change or drop members."""
    with tarfile.open(src) as tin, tarfile.open(dst, "w") as tout:
        for info in tin.getmembers():
            data = tin.extractfile(info).read() if info.isfile() else b""
            for new_info, new_data in edit(info, data):
                new_info.size = len(new_data) if new_info.isfile() else 0
                tout.addfile(new_info, io.BytesIO(new_data) if new_info.isfile() else None)


def _flip_byte(info, data):
    if info.name == "model/model.onnx.data":
        data = bytearray(data)
        data[len(data) // 2] ^= 0x01
        data = bytes(data)
    yield info, data


def _extra_member(info, data):
    yield info, data
    if info.name == "model/tokenizer.json":
        extra = tarfile.TarInfo("model/extra.py")
        yield extra, b"print('not listed')\n"


def _link_member(info, data):
    if info.name == "model/tokenizer.json":
        link = tarfile.TarInfo(info.name)
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        yield link, b""
    else:
        yield info, data


def _drop_member(info, data):
    if info.name != "model/tokenizer.json":
        yield info, data


def _sneak_in_an_unlisted_name(info, data):
    if info.name == "model/tokenizer.json":
        info.name = "model/../../escape.json"
    yield info, data


@pytest.mark.parametrize("edit, says", [(_flip_byte, "sha256 or size does not match"),
                                        (_extra_member, "not listed"), (_link_member, "a link or special file"),
                                        (_drop_member, "lacks tokenizer.json"),
                                        (_sneak_in_an_unlisted_name, "not listed")])
def test_a_tampered_archive_is_refused_and_leaves_nothing(two_models, tmp_path, monkeypatch, edit, says):
    good, bad = tmp_path / "good.tar", tmp_path / "bad.tar"
    cli("pack", "tiny-llama", good)
    _rewrite(good, bad, edit)
    assert hashlib.sha256(good.read_bytes()).digest() != hashlib.sha256(bad.read_bytes()).digest()
    other = tmp_path / "other-store"
    monkeypatch.setenv("EDGE_INFER_HOME", str(other))
    result = cli("import", bad, ok=False)
    assert result.exit_code == 2 and says in result.stderr, result.stderr
    assert files_under(other) == [] and stored_names() == []
    assert not (tmp_path / "escape.json").exists()
    cli("import", good)  # the untouched archive still imports
    assert [str(n) for n in stored_names()] == ["tiny-llama:latest"]


def _hub_repo(cache: Path, repo: str, files: dict[str, Path]) -> None:
    """A repository in a Hugging Face hub cache as huggingface_hub lays it out: blobs by hash,
    snapshots/<revision>/ linking to them, refs/main naming the revision."""
    root = cache / ("models--" + repo.replace("/", "--"))
    revision = hashlib.sha1(repo.encode()).hexdigest()
    for name, src in files.items():
        data = src.read_bytes()
        blob = root / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = root / "snapshots" / revision / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(Path("../..") / "blobs" / blob.name)  # relative, as the hub writes them
    (root / "refs").mkdir(parents=True, exist_ok=True)
    (root / "refs" / "main").write_text(revision)


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    """HF_HUB_OFFLINE=1 and HF_HUB_CACHE at a temporary cache (huggingface_hub reads both at import, so
    its constants are set too: transformers has imported it already)."""
    import huggingface_hub.constants as hc

    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(cache))
    return cache


def test_pull_a_gguf_and_a_folder_from_the_hub_cache(home, sources, offline_hub, tmp_path):
    from gguf_convert import write_gguf
    from tiny import load_reference

    gguf = write_gguf("llama", load_reference(sources["llama"]), tmp_path / "tiny-llama-f32.gguf")
    _hub_repo(offline_hub, "org/Tiny-GGUF", {"Tiny-Llama-F32.gguf": gguf, "README.md": sources["llama"] / "config.json"})
    folder = {p.name: p for p in sources["qwen2"].iterdir()}
    _hub_repo(offline_hub, "org/Tiny-Qwen", folder)

    cli("pull", "hf:org/Tiny-GGUF:Tiny-Llama-F32.gguf", "--quant", "int8", "--max-length", "64", "-q")
    cli("pull", "hf:org/Tiny-Qwen", "--name", "qwen", "--quant", "fp32", "--max-length", "32", "-q")
    assert [str(n) for n in stored_names()] == ["qwen:latest", "tiny-gguf:tiny-llama-f32"]

    # the same bits as exporting the same sources directly
    cli("export", gguf, "--name", "direct-gguf", "--quant", "int8", "--max-length", "64", "-q")
    cli("export", sources["qwen2"], "--name", "direct-qwen", "--quant", "fp32", "--max-length", "32", "-q")
    for pulled, direct in (("tiny-gguf:tiny-llama-f32", "direct-gguf"), ("qwen", "direct-qwen")):
        a, b = (json.loads((folder_of(n) / "manifest.json").read_text())["files"] for n in (pulled, direct))
        assert a["model.onnx.data"]["sha256"] == b["model.onnx.data"]["sha256"]
        assert a["tokenizer.json"] == b["tokenizer.json"]


def test_pull_names_what_is_missing(home, offline_hub, sources):
    result = cli("pull", "hf:org/absent", ok=False)
    assert result.exit_code == 2 and "cannot fetch it" in result.stderr and "HF_HUB_OFFLINE" in result.stderr
    _hub_repo(offline_hub, "org/only-gguf", {"x.gguf": sources["llama"] / "config.json"})
    result = cli("pull", "hf:org/only-gguf", ok=False)
    assert "no config.json" in result.stderr and "hf:org/only-gguf:FILE.gguf" in result.stderr
    for bad in ("org/repo", "hf:repo", "hf:org/repo:model.bin", "hf:org/../x"):
        assert cli("pull", bad, ok=False).exit_code == 2
    assert stored_names() == [] and files_under(home) == []



@pytest.mark.parametrize("platform, env, want", [
    ("linux", {"XDG_DATA_HOME": "/xdg"}, "/xdg/edge-infer"),
    ("linux", {}, "~/.local/share/edge-infer"),
    ("win32", {"LOCALAPPDATA": "/appdata/local"}, "/appdata/local/edge-infer"),
    ("darwin", {}, "~/Library/Application Support/edge-infer"),
])
def test_the_store_defaults_to_the_platform_user_data_directory(monkeypatch, platform, env, want):
    from edge_infer.contract import model_store

    for var in ("EDGE_INFER_HOME", "XDG_DATA_HOME", "LOCALAPPDATA"):
        monkeypatch.delenv(var, raising=False)
    for var, value in env.items():
        monkeypatch.setenv(var, value)
    monkeypatch.setattr(model_store.sys, "platform", platform)
    assert model_store.store_home() == Path(want).expanduser()
    monkeypatch.setenv("EDGE_INFER_HOME", "/elsewhere")
    assert model_store.models_root() == Path("/elsewhere/models")


def test_a_compressed_pack_imports_the_same(two_models, tmp_path, monkeypatch):
    archive = tmp_path / "llama.tar.gz"
    cli("pack", "tiny-llama", archive)
    assert archive.read_bytes()[:2] == b"\x1f\x8b"  # gzip
    files = {p.name: p.read_bytes() for p in files_under(folder_of("tiny-llama"))}
    monkeypatch.setenv("EDGE_INFER_HOME", str(tmp_path / "other"))
    cli("import", archive, "--name", "carried:gz")
    assert {p.name: p.read_bytes() for p in files_under(folder_of("carried:gz"))} == files
