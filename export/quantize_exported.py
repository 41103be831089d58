"""`edge-infer quantize`: an exported fp32/fp16 model folder -> an int8/int4 model folder.

The input's graph, tokenizer and chat template are read through its manifest
(hashes verified); the output is written atomically with a new manifest that
records the scheme and the top-1 agreement / KL against the input.
"""

from __future__ import annotations

import json
from dataclasses import replace
import shutil
from pathlib import Path

import onnx

from edge_infer.export.atomic import atomic_folder
from edge_infer.export.progress import Progress
from edge_infer.quantize.external import DataFile, read_tensor, save_streamed
from edge_infer.quantize.config import QuantConfig
from edge_infer.quantize.rewrite import decide_lm_head, quantize_graph, quantize_summary
from edge_infer.contract.errors import UserError
from edge_infer.contract.model_folder import DATA_FILE, write_manifest
from edge_infer.contract.quantization import QuantRecord
from edge_infer.runtime.manifest import load_manifest
from edge_infer.runtime.model import check_external_data


def quantize_folder(src: str | Path, out: str | Path, config: QuantConfig, validate: bool = True,
                    force: bool = False, progress: Progress | None = None) -> Path:
    progress = progress or Progress(quiet=True)
    config.validate()
    src, out = Path(src), Path(out)
    progress.stage(f"verifying {src}")
    manifest = load_manifest(src, verify=True)
    src = manifest.folder  # a model store name becomes its folder
    if manifest.quant_scheme not in ("fp32", "fp16"):
        raise UserError(f"{src}: is already quantized ({manifest.quant_scheme}); quantize an fp32 or fp16 export")
    if manifest.kv_layout == "static":
        raise UserError(f"{src}: is an npu-profile export (two static graphs); re-export it with "
                        "`edge-infer export SRC -o OUT --profile npu --quant int8|int4` instead")
    if out.resolve() == src.resolve():
        raise UserError("the output folder must differ from the input folder")
    graph_path = src / manifest.graph_file
    check_external_data(graph_path)
    progress.stage("reading graph")
    # Weights stay on disk: each is read when its turn comes and its quantized form goes straight to
    # the new data file (quantize.external), so memory holds one tensor, not the model.
    model = onnx.load(str(graph_path), load_external_data=False)
    config = decide_lm_head(model, config)  # what the manifest records: "auto" decided
    scheme = f"int{config.bits}"
    with atomic_folder(out, force) as tmp:
        progress.stage(f"quantizing to {scheme} (block {config.block_size}, "
                       f"{'symmetric' if config.symmetric else 'asymmetric'})", unit="weight")
        bar = progress.bar("quantize", total=None)
        data = DataFile(tmp / DATA_FILE)
        try:
            quantized = quantize_graph(model, config, progress=bar.update, loader=lambda t: read_tensor(t, src),
                                       sink=lambda t: data.move(t, src))
            bar.close()
            writing = progress.stage("writing model", unit="tensor")
            save_streamed(quantized, tmp / manifest.graph_file, data, src, progress=writing.update)
        finally:
            data.close()
        del quantized, model
        for name in (manifest.tokenizer.file, manifest.tokenizer.chat_template_file):
            if name:
                shutil.copyfile(src / name, tmp / name)
        validation = {}
        if validate:
            validation = _validate(tmp / manifest.graph_file, graph_path, manifest, progress)
        body = {k: v for k, v in manifest.raw.items() if k not in ("format", "format_version", "files")}
        if len(manifest.headers) > 1:  # the other headers describe the new graph too
            from edge_infer.export.graph_headers import write_headers

            body["graph"] = replace(manifest.graph, headers=write_headers(tmp, manifest.graph_file)).to_manifest()
        summary = quantize_summary(onnx.load(str(tmp / manifest.graph_file), load_external_data=False))
        body["quantization"] = QuantRecord(scheme, config, {"summary": summary, "from": manifest.quant_scheme}).to_manifest()
        body["validation"] = validation
        body["source"] = {**manifest.source, "quantized_from": src.name}
        hashing = progress.stage("writing manifest", unit="B", key="manifest")
        write_manifest(tmp, json.loads(json.dumps(body)), hashing.update)
    progress.done(f"quantized to {out}")
    return out


def _validate(graph: Path, reference: Path, manifest, progress: Progress) -> dict:
    from edge_infer.export.validate import compare_graphs

    from edge_infer.runtime.tokenizer import Tokenizer

    tok = Tokenizer(manifest.folder / manifest.tokenizer.file, manifest.tokenizer)
    return compare_graphs(graph, reference, manifest.geometry, tok.backend, manifest.geometry.max_length, progress)
