"""The contract every folder shares, depending on nothing else of ours.

- `errors.py`: the error types every layer raises and the CLI and server turn into exit codes
  and HTTP answers.
- `model_folder.py`: the model folder on disk: file names, the manifest's envelope (format, version,
  the sha256 of every file) and how it is written.
- `model_store.py`: the model store (EDGE_INFER_HOME): what a model name is, where its folder is, and
  how a name given for a path resolves (a path that exists wins).
- `io_names.py`: the decoder graph's input and output names, spelled once.
- `quantization.py`: the manifest's quantization record, typed (QuantSettings, QuantRecord): written
  by export and quantize, read back by the runtime.
- `graph_record.py`: the manifest's graph record, typed (GraphRecord), and the KV cache's size
  (kv_cache_bytes): written by export, read back by the runtime.

Devices, runtime, quantize, export, bench and serve all import these from here, never from each
other (tests/test_borders.py keeps it so).
"""
