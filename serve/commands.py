"""`edge-infer serve`: the OpenAI-compatible local server. Mounted by edge_infer/cli.py; heavy modules are
imported inside the command."""

from __future__ import annotations

from pathlib import Path

import click

from edge_infer.runtime.cli_options import (chat_template_option, speculative_from_options, speculative_options,
                                            wants_shared_threads)


@click.command()
@click.argument("models", nargs=-1)
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to bind. Anything but loopback needs an API key.")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True)
@click.option("--api-key", envvar="EDGE_INFER_API_KEY", default=None,
              help="Require 'Authorization: Bearer KEY' on every route but /health [env EDGE_INFER_API_KEY].")
@click.option("--api-key-file", type=click.Path(dir_okay=False), default=None,
              help="Read the API key from this file (keeps it out of the process list).")
@click.option("--parallel", type=click.IntRange(1, 256), default=4, show_default=True,
              help="Slots: requests decoded together in one batched step.")
@click.option("--max-length", type=click.IntRange(min=2), default=None,
              help="Positions per slot [default: the model's exported max_length].")
@click.option("--max-queue", type=click.IntRange(0, 65536), default=32, show_default=True,
              help="Requests waiting for a slot; beyond this new requests get 429.")
@click.option("--prefill-chunk", type=click.IntRange(min=1), default=256, show_default=True,
              help="Prompt tokens per scheduler step: bounds how long a new prompt stalls running streams.")
@click.option("--default-max-tokens", type=click.IntRange(min=1), default=None,
              help="max_tokens for requests that give none [default: the rest of the context].")
@click.option("--allowed-host", multiple=True,
              help="Host header name to accept besides loopback names (repeatable; DNS-rebinding guard).")
@click.option("--cors-origin", multiple=True,
              help="Origin allowed to call from a browser, e.g. http://localhost:3000 (repeatable; no wildcards).")
@click.option("--model-name", default=None, help="The model id clients see [default: the folder's name].")
@click.option("--model-alias", multiple=True,
              help="Another name requests may give as \"model\" (repeatable); any other name is a 404.")
@click.option("--shutdown-grace", type=click.FloatRange(min=0), default=5.0, show_default=True,
              help="Seconds running requests get to finish on SIGTERM.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, dml, qnn, coreml, openvino or openvino:NPU|GPU|CPU (see `edge-infer devices`).")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="CPU threads [default: cores].")
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]), default="info",
              show_default=True, help="info logs one line per request (no prompt text); debug adds access logs.")
@click.option("--ray", "use_ray", is_flag=True,
              help="Serve on Ray Serve replicas (a local Ray cluster, or RAY_ADDRESS / --ray-address); "
                   "needs the cluster extra.")
@click.option("--replicas", type=click.IntRange(1, 256), default=2, show_default=True,
              help="With --ray: engines, each a Ray Serve deployment over the same model folder.")
@click.option("--routing", type=click.Choice(["prefix", "round-robin"]), default="prefix", show_default=True,
              help="With --ray: send a request to the replica holding its prompt prefix (fallback: least loaded).")
@click.option("--ray-address", default=None, help="With --ray: a running Ray cluster to join [default: start one].")
@click.option("--keep-alive", default=None,
              help="Several models: how long a model stays loaded after its last request (300, 90s, 5m, 1h; 0 "
                   "unloads at once, -1 never) [default: 5m].")
@click.option("--max-loaded", type=click.IntRange(min=1), default=None,
              help="Several models: most loaded at once; the least recently used idle one unloads first.")
@click.option("--max-memory", default=None,
              help="Several models: memory budget (e.g. 8G, 512M), checked against each model's files plus the "
                   "KV cache of its slots before it loads; least recently used idle models unload to make room.")
@click.option("--reasoning-format", type=click.Choice(["none", "separate"]), default="separate", show_default=True,
              help="Reasoning models (a template that writes <think>): separate returns the thinking as "
                   "reasoning_content (Anthropic: thinking blocks); none leaves it in the content.")
@click.option("--strict", is_flag=True,
              help="Answer unknown request fields with a 400, as the OpenAI API does [default: ignore them, log "
                   "each name once, count them in /metrics, and honour llama-server's and Ollama's extras].")
@chat_template_option
@speculative_options
def serve(models, host, port, api_key, api_key_file, parallel, max_length, max_queue, prefill_chunk,
          default_max_tokens, allowed_host, cors_origin, model_name, model_alias, shutdown_grace, device, threads,
          log_level, use_ray, replicas, routing, ray_address, keep_alive, max_loaded, max_memory,
          reasoning_format, strict, chat_template, **speculative_kw):
    """Serve MODEL (a folder or a store name) over an OpenAI-compatible HTTP API (chat and text
    completions, streaming).

    With no MODEL, every model in the store (`edge-infer list`) is served; with several names,
    those. Each loads when a request first names it, and unloads after --keep-alive idle, or
    sooner to stay within --max-loaded / --max-memory.

    With --speculative, a request that decodes alone has its guesses verified several at a time;
    the output is the same."""
    from edge_infer.contract.errors import UserError
    from edge_infer.serve.config import EngineConfig, ServerConfig

    if api_key and api_key_file:
        raise UserError("pass --api-key or --api-key-file, not both")
    if api_key_file:
        try:
            api_key = Path(api_key_file).read_text(encoding="utf-8").strip()
        except OSError as e:
            raise UserError(f"cannot read the API key file {api_key_file}: {e.strerror}") from None
        if not api_key:
            raise UserError(f"the API key file {api_key_file} is empty")
    from edge_infer.serve.app import model_id_for

    many = len(models) != 1 or any(v is not None for v in (keep_alive, max_loaded, max_memory))
    many = many or _embedding_model(models[0])  # an embedder is held by the registry, never by an engine
    model = models[0] if len(models) == 1 else ""
    server_config = ServerConfig(model_id=model_name or (model_id_for(model) if model else ""), host=host, port=port,
                                 api_key=api_key or None, allowed_hosts=tuple(allowed_host),
                                 cors_origins=tuple(cors_origin), model_aliases=tuple(model_alias), strict=strict,
                                 reasoning_format=reasoning_format)
    engine_config = EngineConfig(parallel=parallel, max_queue=max_queue, max_length=max_length,
                                 prefill_chunk=prefill_chunk, default_max_tokens=default_max_tokens,
                                 shutdown_grace_s=shutdown_grace)
    server_config.validate()  # before loading anything: a refused bind costs nothing
    engine_config.validate()
    if many:
        from edge_infer.serve.registry import RegistrySettings

        # one folder given by path (an embedding model): served by the same registry, under its folder's name
        folders = {server_config.model_id: Path(model).resolve()} if model and Path(model).exists() else None
        if (model_name and not folders) or model_alias or use_ray or speculative_kw.get("draft_model") or \
                chat_template is not None:
            raise UserError("--model-name, --model-alias, --ray, --draft and --chat-template serve one model; a "
                            "server of several models serves each under its store name with its own template "
                            "(serve one MODEL to use them)")
        settings = RegistrySettings(keep_alive_s=parse_duration(keep_alive or "5m"), max_loaded=max_loaded,
                                    max_memory=None if max_memory is None else parse_size(max_memory))
        settings.validate()
        _serve_many(None if folders else list(models) or None, server_config, engine_config, settings, device,
                    threads, log_level, speculative_kw, folders)
        return
    if use_ray:
        _serve_on_ray(model, server_config, engine_config, replicas, routing, ray_address, device, threads,
                      speculative_kw, chat_template)
        return

    _serve_one(model, server_config, engine_config, device, threads, log_level, chat_template, speculative_kw)


def _embedding_model(ref: str) -> bool:
    """Whether `ref` (a store name or a folder) is an embedding model: the registry of a server of
    several models serves it, alone or beside chat models, never an engine."""
    from edge_infer.contract.embedding import TASK_EMBED
    from edge_infer.contract.errors import UserError
    from edge_infer.contract.model_store import resolve_model
    from edge_infer.runtime.manifest import load_manifest

    try:
        folder = resolve_model(ref)
        embedding = load_manifest(folder, verify=False).task == TASK_EMBED
    except UserError:
        return False  # the one-model path names the problem
    return embedding


def _serve_one(model, server_config, engine_config, device, threads, log_level, chat_template, speculative_kw):
    """A server of one model, loaded before the server starts listening."""
    import dataclasses
    import logging

    from edge_infer.runtime.model import load
    from edge_infer.serve.app import build_app
    from edge_infer.serve.runner import bind, serve_forever

    host = server_config.host
    sock = bind(host, server_config.port)  # before loading: a port in use fails fast
    logging.basicConfig(level=getattr(logging, log_level.upper()), format="%(asctime)s %(levelname)s %(message)s")
    m = load(model, device=device, threads=threads, shared_threads=wants_shared_threads(speculative_kw),
             chat_template=chat_template)
    speculative = speculative_from_options(speculative_kw, m, device, threads)
    if speculative is not None:
        engine_config = dataclasses.replace(engine_config, speculative=speculative)
    app = build_app(m, server_config, engine_config)
    engine = app.state.engine
    kv = engine.cache.nbytes() / 2**20
    click.echo(f"[{m.manifest.geometry.architecture} {m.manifest.quant_scheme} on {m.describe_device()}; "
               f"{engine_config.parallel} slots x {engine.max_length} positions, KV cache {kv:.0f} MiB"
               + (f"; speculative {speculative.mode}" if speculative is not None else "") + "]", err=True)
    click.echo(f"  threads spinning {m.describe_spinning()}", err=True)
    shown = f"[{host}]" if ":" in host else host
    base = f"http://{shown}:{sock.getsockname()[1]}"
    click.echo(f"serving '{server_config.model_id}' at {base}/v1, chat page at {base}/"
               + (" (API key required)" if server_config.api_key else ""), err=True)
    serve_forever(app, sock, log_level)


def parse_duration(text: str) -> float:
    """Seconds from 300, 90s, 5m, 1h, 0 or -1 (never)."""
    from edge_infer.contract.errors import UserError

    t = str(text).strip().lower()
    scale = {"s": 1, "m": 60, "h": 3600}.get(t[-1:], None)
    try:
        value = float(t[:-1] if scale else t) * (scale or 1)
    except ValueError:
        raise UserError(f"--keep-alive {text!r}: give seconds (300), or 90s, 5m, 1h; 0 unloads at once, "
                        "-1 never") from None
    if value < 0 and value != -1:
        raise UserError(f"--keep-alive {text!r}: the only negative value is -1 (never unload)")
    return value


def parse_size(text: str) -> int:
    """Bytes from 8G, 512M, 100K or a plain number of bytes (powers of 1024)."""
    from edge_infer.contract.errors import UserError

    t = str(text).strip().upper().removesuffix("IB").removesuffix("B")
    scale = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}.get(t[-1:], None)
    try:
        value = float(t[:-1] if scale else t) * (scale or 1)
    except ValueError:
        raise UserError(f"--max-memory {text!r}: give a size such as 8G, 512M or a number of bytes") from None
    if value <= 0:
        raise UserError(f"--max-memory {text!r} must be positive")
    return int(value)


def _serve_many(names, server_config, engine_config, settings, device, threads, log_level, speculative_kw,
                folders=None) -> None:
    """A server of several models (the store, `names`, or `folders` given by path), each loaded on first use."""
    import dataclasses
    import logging

    from edge_infer.contract.errors import UserError
    from edge_infer.contract.model_folder import MANIFEST
    from edge_infer.contract.model_store import folder_of, models_root, not_stored, parse_name
    from edge_infer.runtime.speculative import speculative_config
    from edge_infer.serve.app import make_app
    from edge_infer.serve.metrics import Metrics
    from edge_infer.serve.multi import StoreModels
    from edge_infer.serve.runner import bind, serve_forever

    for name in names or []:
        if Path(name).exists():
            raise UserError(f"{name}: with several models, give store names; add a folder to the store with "
                            f"`edge-infer import {name} --name NAME`")
        if not (folder_of(parse_name(name)) / MANIFEST).is_file():
            raise not_stored(name)
    spec = speculative_config(speculative_kw.get("speculative"), num_speculative=speculative_kw.get("num_speculative"))
    engine_config = dataclasses.replace(engine_config, speculative=spec)
    sock = bind(server_config.host, server_config.port)
    logging.basicConfig(level=getattr(logging, log_level.upper()), format="%(asctime)s %(levelname)s %(message)s")
    models = StoreModels(names, engine_config, settings, device=device, threads=threads, folders=folders)
    app = make_app(models, server_config, Metrics())
    keep = settings.keep_alive_s
    if folders:
        served = ", ".join(f"{name} ({folder})" for name, folder in folders.items())
    else:
        served = f"{len(names)} models" if names else f"the store ({models_root()}, {len(models.ids())} models now)"
    click.echo(f"serving {served}, each loaded on first use; keep-alive "
               f"{'forever' if keep < 0 else f'{keep:g} s'}" + (f", at most {settings.max_loaded} loaded"
               if settings.max_loaded else "") + (f", memory budget {settings.max_memory / 2**20:.0f} MiB"
               if settings.max_memory else ""), err=True)
    shown = f"[{server_config.host}]" if ":" in server_config.host else server_config.host
    base = f"http://{shown}:{sock.getsockname()[1]}"
    click.echo(f"listening at {base}/v1, chat page at {base}/"
               + (" (API key required)" if server_config.api_key else ""), err=True)
    serve_forever(app, sock, log_level)


def _serve_on_ray(model, server_config, engine_config, replicas, routing, address, device, threads, speculative_kw,
                  chat_template=None):
    import dataclasses
    import importlib.util

    from edge_infer.contract.errors import UserError

    if importlib.util.find_spec("ray") is None:
        raise UserError("--ray needs Ray Serve: pip install 'edge-infer[cluster]'")
    if speculative_kw.get("speculative") == "draft":
        raise UserError("--ray serves --speculative lookup or off; a draft model per replica is not supported yet")
    from edge_infer.runtime.speculative import speculative_config
    from edge_infer.serve.cluster import ClusterConfig, model_source, read_chat_template, serve_cluster

    folder, _ = model_source(model)  # a store name: its folder (each replica loads the same folder)

    engine = dataclasses.asdict(engine_config)
    engine["speculative"] = speculative_config(speculative_kw.get("speculative"),
                                               num_speculative=speculative_kw.get("num_speculative"))
    config = ClusterConfig(model=folder, replicas=replicas, routing=routing,
                           threads=threads or 1, device=device, server=dataclasses.asdict(server_config),
                           engine=engine, chat_template=read_chat_template(chat_template))
    config.validate()
    if server_config.port:  # a port in use fails here, not after Ray has started (in its HTTP proxy)
        from edge_infer.serve.runner import bind

        bind(server_config.host, server_config.port).close()
    click.echo(f"serving '{server_config.model_id}' on Ray Serve: {replicas} replicas ({routing} routing) at "
               f"http://{server_config.host}:{server_config.port}/v1", err=True)
    serve_cluster(config, server_config.host, server_config.port, address)
