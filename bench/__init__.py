"""`edge-infer bench` and `edge-infer eval`: the harness behind every speed and quality claim.

measure.py times generation and scores text (engine-agnostic: benchmarks/ loads it by file path
into onnxruntime-genai's and llama.cpp's environments); text/ is the English text it measures
with by default, installed with the package; commands.py holds the two commands.
"""
