"""Prometheus metrics, in a registry of the server's own (several servers can live in one process).

Request counts are labelled by route (a fixed set, so a scan of random paths
cannot grow the label space) and HTTP status; the rest is filled by the
engine thread (prometheus-client is thread-safe).
"""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

ROUTES = frozenset({"/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics", "/v1/messages",
                    "/v1/messages/count_tokens", "/v1/embeddings", "/"})
_TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_ITL_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56)


def route_label(path: str) -> str:
    if path.startswith("/v1/models/"):
        return "/v1/models"
    if path.startswith("/ui/"):  # the chat page's files (serve/page.py)
        return "/ui"
    return path if path in ROUTES else "other"


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        p = "edge_infer_"
        self.requests = Counter(p + "requests", "HTTP requests by route and status code", ["route", "status"],
                                registry=r)
        self.generations = Counter(p + "generations", "Generations ended, by finish reason (stop, length, "
                                   "cancelled, error)", ["reason"], registry=r)
        self.prompt_tokens = Counter(p + "prompt_tokens", "Prompt tokens of ended generations", registry=r)
        self.cached_tokens = Counter(p + "prompt_cached_tokens", "Prompt tokens served from the prefix cache",
                                     registry=r)
        self.completion_tokens = Counter(p + "completion_tokens", "Generated tokens", registry=r)
        self.prefix_hits = Counter(p + "prefix_cache_hits", "Requests placed in a slot that already held part "
                                   "of their prompt", registry=r)
        self.ttft = Histogram(p + "time_to_first_token_seconds", "Submit to first token, queue wait included",
                              buckets=_TTFT_BUCKETS, registry=r)
        self.inter_token = Histogram(p + "inter_token_latency_seconds", "Time between a stream's tokens",
                                     buckets=_ITL_BUCKETS, registry=r)
        self.ignored_fields = Counter(p + "ignored_fields", "Unknown request fields ignored (serve --strict refuses "
                                      "them), by name (the first 64 names; later ones count as other)", ["field"],
                                      registry=r)
        self.queue_depth = Gauge(p + "queue_depth", "Requests waiting for a slot", registry=r)
        self.active_slots = Gauge(p + "active_slots", "Slots running a request", registry=r)
        self.slots_total = Gauge(p + "slots", "Slots (--parallel)", registry=r)
        self.speculative = Counter(p + "speculative_tokens", "Guessed tokens verified by the model, by outcome "
                                   "(accepted, rejected)", ["outcome"], registry=r)
        self.kv_used = Gauge(p + "kv_cache_used_ratio", "KV positions in use over capacity: by running requests "
                             "(active), or holding any prefix (cached)", ["kind"], registry=r)
        self.spinning = Gauge(p + "threads_spinning", "1 while onnxruntime's threads spin between kernels, 0 while "
                              "they sleep between them", registry=r)
        self.session_reopens = Counter(p + "session_reopens", "Sessions reopened to change the threads' spinning "
                                       "while idle", registry=r)

    def finished(self, seq, event) -> None:
        """Count an ended generation (called by the engine)."""
        reason = getattr(event, "finish_reason", None) or "error"
        self.generations.labels(reason).inc()
        u = seq.usage()
        self.prompt_tokens.inc(u.prompt_tokens)
        self.cached_tokens.inc(u.cached_tokens)
        self.completion_tokens.inc(u.completion_tokens)

    def speculated(self, proposed: int, accepted: int) -> None:
        self.speculative.labels("accepted").inc(accepted)
        self.speculative.labels("rejected").inc(proposed - accepted)

    def render(self) -> bytes:
        return generate_latest(self.registry)


def merge_metrics(texts: list[str], label: str = "replica", values: list[str] | None = None) -> str:
    """Prometheus text from each replica as one exposition, a `replica` label on every sample
    (each family's HELP and TYPE once, then the samples of every replica); `label` and `values`
    name another label (serve/multi.py: `model`, one value per model)."""
    heads: dict[str, list[str]] = {}
    samples: dict[str, list[str]] = {}
    for index, text in enumerate(texts):
        value = str(index) if values is None else values[index]
        family = ""
        for line in text.splitlines():
            if not line.strip():
                continue
            parts = line.split()
            if line.startswith("#"):
                if len(parts) >= 3 and parts[1] in ("HELP", "TYPE"):
                    family = parts[2]
                    head = heads.setdefault(family, [])
                    samples.setdefault(family, [])
                    if not any(h.split()[1] == parts[1] for h in head):
                        head.append(line)
                continue
            samples.setdefault(family, []).append(_with_label(line, label, value))
            heads.setdefault(family, [])
    return "".join("".join(f"{h}\n" for h in heads[f]) + "".join(f"{x}\n" for x in samples[f]) for f in samples)


def _with_label(sample: str, name: str, value: str) -> str:
    metric, _, rest = sample.partition(" ")
    if "{" in metric:
        head, _, labels = metric.partition("{")
        return f'{head}{{{name}="{value}",{labels} {rest}' if labels != "}" else f'{head}{{{name}="{value}"}} {rest}'
    return f'{metric}{{{name}="{value}"}} {rest}'
