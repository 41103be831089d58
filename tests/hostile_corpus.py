"""A malformed-input corpus, generated from small valid files (see tests/test_hostile_corpus.py).

`generate(out, seeds)` writes one file (or model folder) per case and returns
`[(case_id, kind, path)]`. Mutations, for each kind:
  GGUF: truncations; every count, length, type and offset field of the header set
        to 0, 1, 2**31-1, 2**32-1 (and 2**63, 2**64-1 for 64-bit fields); every
        tensor type id changed; offsets moved; numeric metadata out of range
        (0, 3, huge, NaN, inf, -1); duplicate keys and tensor names.
  safetensors: truncations; the header length, every shape and offset set huge,
        negative, fractional or of the wrong type; unknown dtypes; overlaps,
        gaps; duplicate names; non-object headers; deep nesting.
  manifest.json: every field deleted or set to null, "x", -1, 0, 1.5, 10**12, [],
        {}; truncated and duplicated-key JSON.
  tokenizer.json: truncated JSON, unknown types, huge ids, bad merges, invalid and
        catastrophically backtracking split regexes, deep nesting.
The structural walk of a GGUF file below is written independently of our reader,
so a reader bug cannot hide the field it misreads. Also a script:
`python tests/hostile_corpus.py OUT` (benchmarks/fuzz/ seeds its fuzzer from it).
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path

_SCALAR_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_SCALAR_FMT = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<B", 10: "<Q", 11: "<q",
               12: "<d"}


def gguf_fields(data: bytes) -> list[tuple[str, int, str]]:
    """(field name, byte offset, struct format) of every header field of a valid GGUF file."""
    fields = [("version", 4, "<I"), ("n_tensors", 8, "<Q"), ("n_kv", 16, "<Q")]
    n_tensors, n_kv = struct.unpack_from("<QQ", data, 8)
    pos = 24

    def string(what: str) -> str:
        nonlocal pos
        n = struct.unpack_from("<Q", data, pos)[0]
        fields.append((f"{what}.len", pos, "<Q"))
        text = data[pos + 8:pos + 8 + n].decode()
        pos += 8 + n
        return text

    def value(vtype: int, what: str) -> None:
        nonlocal pos
        if vtype in _SCALAR_SIZES:
            fields.append((f"{what}.value", pos, _SCALAR_FMT[vtype]))
            pos += _SCALAR_SIZES[vtype]
        elif vtype == 8:
            string(what)
        else:
            itype = struct.unpack_from("<I", data, pos)[0]
            fields.append((f"{what}.item_type", pos, "<I"))
            count = struct.unpack_from("<Q", data, pos + 4)[0]
            fields.append((f"{what}.count", pos + 4, "<Q"))
            pos += 12
            for i in range(count):
                if i < 2:
                    value(itype, f"{what}[{i}]")
                else:  # only the first items of long arrays get their own fields
                    before = len(fields)
                    value(itype, f"{what}[{i}]")
                    del fields[before:]

    for i in range(n_kv):
        key = string(f"kv{i}.key")
        fields.append((f"kv:{key}.type", pos, "<I"))
        vtype = struct.unpack_from("<I", data, pos)[0]
        pos += 4
        value(vtype, f"kv:{key}")
    for i in range(n_tensors):
        name = string(f"tensor{i}.name")
        n_dims = struct.unpack_from("<I", data, pos)[0]
        fields.append((f"t:{name}.n_dims", pos, "<I"))
        pos += 4
        for d in range(n_dims):
            fields.append((f"t:{name}.dim{d}", pos, "<Q"))
            pos += 8
        fields.append((f"t:{name}.type", pos, "<I"))
        fields.append((f"t:{name}.offset", pos + 4, "<Q"))
        pos += 12
    return fields


def _put(data: bytes, pos: int, fmt: str, value) -> bytes:
    packed = struct.pack(fmt, value)
    return data[:pos] + packed + data[pos + len(packed):]


def gguf_cases(seed: bytes) -> dict[str, bytes]:
    cases: dict[str, bytes] = {}
    size = len(seed)
    for cut in sorted({0, 3, 4, 8, 16, 23, 24, 25, 40, 64, 100, 200, 400} | {size * k // 20 for k in range(1, 20)}
                      | {size - 1, size - 31}):
        if 0 <= cut < size:
            cases[f"cut at {cut}"] = seed[:cut]
    fields = gguf_fields(seed)
    for name, pos, fmt in fields:
        if fmt in ("<f", "<d"):
            values = [0.0, -1.0, 3.0, 1e30, float("nan"), float("inf")]
        elif fmt in ("<B", "<b"):
            values = [0, 1, 0x7F] if fmt == "<b" else [0, 2, 255]
        elif fmt in ("<H", "<h"):
            values = [0, 3, 0x7FFF]
        elif fmt in ("<I", "<i"):
            values = [0, 1, 3, 2**31 - 1] + ([2**32 - 1] if fmt == "<I" else [-1])
        else:
            values = [0, 1, 3, 2**31 - 1, 2**32 - 1] + ([2**63, 2**64 - 1] if fmt == "<Q" else [-1, 2**63 - 1])
        for v in values:
            cases[f"{name}={v}"] = _put(seed, pos, fmt, v)
    for name, pos, fmt in fields:
        if name.endswith(".type") and name.startswith("t:"):
            for t in list(range(0, 42)) + [99, 2**31]:
                cases[f"{name}={t}"] = _put(seed, pos, fmt, t)
        if name.endswith(".offset"):
            old = struct.unpack_from("<Q", seed, pos)[0]
            for delta in (-32, -1, 1, 32, 64):
                if old + delta >= 0:
                    cases[f"{name}{delta:+d}"] = _put(seed, pos, fmt, old + delta)
    # duplicates: a key or tensor name replaced by an earlier one of the same length
    names = [(n, p) for n, p, _ in fields if n.endswith(".len")]
    texts = []
    for n, p in names:
        length = struct.unpack_from("<Q", seed, p)[0]
        texts.append((n, p + 8, seed[p + 8:p + 8 + length]))
    for i, (n1, _, t1) in enumerate(texts):
        for n2, p2, t2 in texts[i + 1:]:
            if len(t1) == len(t2) and t1 != t2 and (n1.split(".")[0][:2] == n2.split(".")[0][:2]):
                cases[f"duplicate {t2.decode()} -> {t1.decode()}"] = seed[:p2] + t1 + seed[p2 + len(t1):]
                break
    cases["appended bytes"] = seed + bytes(4096)
    return {name: data for name, data in cases.items() if data != seed}  # no identity "mutations"


def safetensors_seed() -> bytes:
    header = {"__metadata__": {"format": "pt"},
              "a": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]},
              "b": {"dtype": "F16", "shape": [4], "data_offsets": [24, 32]},
              "c": {"dtype": "BF16", "shape": [2, 2], "data_offsets": [32, 40]}}
    return _safetensors(json.dumps(header), bytes(range(40)))


def _safetensors(header: str, data: bytes) -> bytes:
    raw = header.encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + data


def safetensors_cases(seed: bytes) -> dict[str, bytes]:
    n = struct.unpack_from("<Q", seed)[0]
    header = json.loads(seed[8:8 + n])
    data = seed[8 + n:]
    cases = {f"cut at {c}": seed[:c] for c in (0, 4, 7, 8, 9, 20, 8 + n - 1, 8 + n, len(seed) - 1)}
    for v in (0, 1, 2**31 - 1, 2**32 - 1, 2**63, 2**64 - 1, len(seed)):
        cases[f"header length={v}"] = _put(seed, 0, "<Q", v)

    def variant(name: str, change) -> None:
        h = json.loads(json.dumps(header))
        change(h)
        cases[name] = _safetensors(json.dumps(h), data)

    bad_values = [-1, 2**40, 2**64, 1.5, "3", None, [], True, [1]]
    for t in ("a", "b"):
        for v in bad_values:
            variant(f"{t}.shape[0]={v!r}", lambda h, t=t, v=v: h[t]["shape"].__setitem__(0, v))
            variant(f"{t}.data_offsets[1]={v!r}", lambda h, t=t, v=v: h[t]["data_offsets"].__setitem__(1, v))
            variant(f"{t}.data_offsets[0]={v!r}", lambda h, t=t, v=v: h[t]["data_offsets"].__setitem__(0, v))
            variant(f"{t}.dtype={v!r}", lambda h, t=t, v=v: h[t].__setitem__("dtype", v))
            variant(f"{t}.shape={v!r}", lambda h, t=t, v=v: h[t].__setitem__("shape", v))
            variant(f"{t}={v!r}", lambda h, t=t, v=v: h.__setitem__(t, v))
        variant(f"{t} shape huge product", lambda h, t=t: h[t].__setitem__("shape", [2**32, 2**32, 2**32]))
        variant(f"{t} shape overflow int64", lambda h, t=t: h[t].__setitem__("shape", [2**62, 4, 0]))
        variant(f"{t} negative shape pair", lambda h, t=t: h[t].__setitem__("shape", [-2, -3]))
        variant(f"{t} 64 dims", lambda h, t=t: h[t].__setitem__("shape", [1] * 64))
        variant(f"{t} dtype XX", lambda h, t=t: h[t].__setitem__("dtype", "F8_E4M3"))
        variant(f"{t} missing dtype", lambda h, t=t: h[t].pop("dtype"))
        variant(f"{t} extra field", lambda h, t=t: h[t].__setitem__("x", 1))
    variant("overlap", lambda h: h["b"].__setitem__("data_offsets", [16, 24]) or h["b"].__setitem__("shape", [4]))
    variant("gap", lambda h: h.pop("b"))
    variant("metadata not strings", lambda h: h.__setitem__("__metadata__", {"x": 1}))
    variant("metadata a list", lambda h: h.__setitem__("__metadata__", [1]))
    raw = json.dumps(header)
    cases["header a list"] = _safetensors("[1, 2]", data)
    cases["header a string"] = _safetensors('"x"', data)
    cases["header invalid json"] = _safetensors(raw[:-3], data)
    bad_utf8 = raw.encode().replace(b'"pt"', b'"\xff\xfe"')
    cases["header invalid utf-8"] = struct.pack("<Q", len(bad_utf8)) + bad_utf8 + data
    cases["header deep nesting"] = _safetensors("[" * 100000 + "]" * 100000, data)
    cases["header 5000-digit number"] = _safetensors(raw.replace("[0, 24]", "[0, " + "9" * 5000 + "]"), data)
    cases["duplicate name"] = _safetensors(raw.replace('"b"', '"a"'), data)
    cases["appended bytes"] = seed + bytes(8)
    return cases


def manifest_cases(doc: dict) -> dict[str, str]:
    """manifest.json texts."""
    cases: dict[str, str] = {}
    raw = json.dumps(doc)
    for section in ("model", "graph", "tokenizer", "generation", "quantization"):
        if not isinstance(doc.get(section), dict):
            continue
        for key in list(doc[section]):
            for v in ("<delete>", None, "x", -1, 0, 1.5, 10**12, [], {}, True, "\ud800"):
                d = json.loads(raw)
                if v == "<delete>":
                    del d[section][key]
                else:
                    d[section][key] = v
                cases[f"{section}.{key}={v!r}"] = json.dumps(d)
        for v in (None, "x", [], 1):
            d = json.loads(raw)
            d[section] = v
            cases[f"{section}={v!r}"] = json.dumps(d)
    first = next(iter(doc["files"]))
    for v in ("x", None, [], {}, {"sha256": "x", "size": 1}, {"sha256": "0" * 64, "size": -1},
              {"sha256": "0" * 64, "size": 10**20}):
        d = json.loads(raw)
        d["files"][first] = v
        cases[f"files[{first}]={v!r}"] = json.dumps(d)
    d = json.loads(raw)
    d["files"]["../../etc/passwd"] = {"sha256": "0" * 64, "size": 1}
    cases["files escape"] = json.dumps(d)
    cases["truncated"] = raw[: len(raw) // 2]
    cases["not an object"] = "[1]"
    cases["duplicate key"] = raw.replace('"model": {', '"model": {"num_layers": 1, ', 1)
    cases["5000-digit number"] = raw.replace('"format_version": 2', '"format_version": ' + "1" * 5000)
    cases["deep nesting"] = raw[:-1] + ', "x": ' + "[" * 100000 + "]" * 100000 + "}"
    cases["format version 3"] = raw.replace('"format_version": 2', '"format_version": 3')
    cases["format version 1"] = raw.replace('"format_version": 2', '"format_version": 1')
    return cases


def tokenizer_cases(doc: dict) -> dict[str, str]:
    cases: dict[str, str] = {}
    raw = json.dumps(doc)

    def variant(name: str, change) -> None:
        d = json.loads(raw)
        change(d)
        cases[name] = json.dumps(d)

    split = {"type": "Split", "pattern": {"Regex": "(a+)+$"}, "behavior": "Isolated", "invert": False}
    variant("backtracking split", lambda d: d.__setitem__("pre_tokenizer", {"type": "Sequence", "pretokenizers": [
        split, d["pre_tokenizer"]]}))
    variant("invalid regex", lambda d: d.__setitem__("pre_tokenizer", {**split, "pattern": {"Regex": "(a"}}))
    variant("unknown pre_tokenizer", lambda d: d.__setitem__("pre_tokenizer", {"type": "Nope"}))
    variant("unknown model", lambda d: d["model"].__setitem__("type", "Nope"))
    variant("model null", lambda d: d.__setitem__("model", None))
    variant("huge vocab id", lambda d: d["model"]["vocab"].__setitem__("zzz", 2**32))
    variant("negative vocab id", lambda d: d["model"]["vocab"].__setitem__("zzz", -1))
    variant("vocab id 2**31", lambda d: d["model"]["vocab"].__setitem__("zzz", 2**31 - 1))
    variant("merges garbage", lambda d: d["model"].__setitem__("merges", [1, 2, 3]))
    variant("merge of unknown tokens", lambda d: d["model"].__setitem__("merges", ["qqq rrr"]))
    variant("added token huge id", lambda d: d.__setitem__("added_tokens", [
        {"id": 2**32, "content": "<x>", "single_word": False, "lstrip": False, "rstrip": False,
         "normalized": False, "special": True}]))
    variant("added token id 2**30", lambda d: d.__setitem__("added_tokens", [
        {"id": 2**30, "content": "<x>", "single_word": False, "lstrip": False, "rstrip": False,
         "normalized": False, "special": True}]))
    variant("unknown normalizer", lambda d: d.__setitem__("normalizer", {"type": "Nope"}))
    variant("unknown decoder", lambda d: d.__setitem__("decoder", {"type": "Nope"}))
    cases["truncated"] = raw[: len(raw) // 2]
    cases["not json"] = "\x00\x01garbage"
    cases["a list"] = "[]"
    cases["deep nesting"] = "[" * 100000 + "]" * 100000
    return cases


def generate(out: Path, gguf_seed: Path, model_folder: Path) -> list[tuple[str, str, str]]:
    """Write every case under `out`; returns [(case_id, kind, path)]."""
    out.mkdir(parents=True, exist_ok=True)
    made: list[tuple[str, str, str]] = []
    for kind, cases, ext in (("gguf", gguf_cases(gguf_seed.read_bytes()), ".gguf"),
                             ("safetensors", safetensors_cases(safetensors_seed()), ".safetensors")):
        for i, (name, data) in enumerate(cases.items()):
            path = out / kind / f"{i:04d}{ext}"
            path.parent.mkdir(exist_ok=True)
            path.write_bytes(data)
            made.append((f"{kind}: {name}", kind, str(path)))
    doc = json.loads((model_folder / "manifest.json").read_text(encoding="utf-8"))
    base = out / "manifest-base"
    if base.exists():
        shutil.rmtree(base)
    shutil.copytree(model_folder, base)
    for i, (name, text) in enumerate(manifest_cases(doc).items()):
        folder = out / "manifest" / f"{i:04d}"
        folder.mkdir(parents=True, exist_ok=True)
        for f in base.iterdir():  # the same files, hard-linked: only manifest.json differs
            if f.name != "manifest.json" and not (folder / f.name).exists():
                os.link(f, folder / f.name)
        (folder / "manifest.json").write_bytes(text.encode("utf-8", "surrogatepass"))
        made.append((f"manifest: {name}", "manifest", str(folder)))
    tok = json.loads((model_folder / "tokenizer.json").read_text(encoding="utf-8"))
    for i, (name, text) in enumerate(tokenizer_cases(tok).items()):
        path = out / "tokenizer" / f"{i:04d}.json"
        path.parent.mkdir(exist_ok=True)
        path.write_text(text, encoding="utf-8")
        made.append((f"tokenizer: {name}", "tokenizer", str(path)))
    return made


if __name__ == "__main__":
    import sys

    target, gguf, folder = (Path(a) for a in sys.argv[1:4])
    print(len(generate(target, gguf, folder)), "cases written to", target)
