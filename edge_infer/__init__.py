"""edge-infer: on-device LLM inference on onnxruntime.

    import edge_infer
    model = edge_infer.load("smollm2-int4")
    for chunk in edge_infer.stream_generate(model, [{"role": "user", "content": "Hi"}], max_tokens=64):
        print(chunk.text, end="")

Loading and generating import onnxruntime, numpy, tokenizers and jinja2 only.
"""

from edge_infer.runtime.errors import ContextLengthError, ModelFileError, UserError
from edge_infer.runtime.generate import Chunk, FinishReason, Timings, generate, stream_generate
from edge_infer.runtime.model import Model, load
from edge_infer.runtime.sampling import SamplingParams
from edge_infer.runtime.speculative import SpeculativeConfig

__version__ = "0.1.0"
__all__ = [
    "load", "generate", "stream_generate", "Model", "Chunk", "FinishReason", "Timings", "SamplingParams",
    "SpeculativeConfig", "UserError", "ModelFileError", "ContextLengthError", "__version__",
]
