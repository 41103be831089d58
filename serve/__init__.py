"""`edge-infer serve`: an OpenAI-compatible local HTTP server with continuous batching.

engine.py schedules requests over `--parallel` slots of one batched KV cache;
app.py maps the OpenAI routes onto it; guards.py holds the security rules;
commands.py is the command (mounted by edge_infer/cli.py). Install with the `serve` extra (fastapi, uvicorn, prometheus-client).
"""
