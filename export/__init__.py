"""Export: Hugging Face folders and GGUF files to ONNX model folders.

The package is callable: `edge_infer.export(src, out, **options)` runs export/api.py's `export`
(a module and a function share the name `edge_infer.export`).
"""

import sys
import types


class _CallableModule(types.ModuleType):
    def __call__(self, *args, **kwargs):
        from edge_infer.export.api import export

        return export(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
