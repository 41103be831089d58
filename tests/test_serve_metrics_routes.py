"""Request counts are labelled by route from a fixed set: every route the server has gets its own label."""

from edge_infer.serve.metrics import route_label


def test_every_route_of_the_server_has_its_own_label():
    for path in ("/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics", "/v1/messages",
                 "/v1/messages/count_tokens", "/v1/embeddings", "/"):
        assert route_label(path) == path
    assert route_label("/v1/models/smol") == "/v1/models"
    assert route_label("/ui/chat.js") == "/ui"
    assert route_label("/wp-admin/setup.php") == route_label("/v1/nothing") == "other"  # a scan cannot grow labels
