"""`serve --ray --chat-template NAME|FILE` (was refused): the driver reads the template once and every
Ray replica (serve/cluster.py EngineReplica) uses it in place of the folder's own, as the
single-process server does with the same option. Checked without starting Ray: the CLI's
ClusterConfig, and a replica built in-process against `load(..., chat_template=...)`."""

from __future__ import annotations

import dataclasses

from click.testing import CliRunner

import edge_infer
from edge_infer.runtime.template_library import resolve

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of France?"}]


def _cluster_config(monkeypatch, args: list[str]):
    """The ClusterConfig `edge-infer serve ARGS --ray` hands to Ray Serve (serve_cluster recorded, not run)."""
    import edge_infer.serve.cluster as cluster
    from edge_infer.cli import main

    seen = []
    monkeypatch.setattr(cluster, "serve_cluster", lambda config, *a, **k: seen.append(config))
    r = CliRunner().invoke(main, ["serve", *args, "--ray", "--replicas", "2", "--port", "0"])
    assert r.exit_code == 0 and len(seen) == 1, r.output
    return seen[0]


def test_serve_ray_passes_a_builtin_or_file_template_to_the_replicas(tiny_exports, tmp_path, monkeypatch):
    folder = str(tiny_exports("llama", "fp32"))
    config = _cluster_config(monkeypatch, [folder, "--chat-template", "chatml"])
    assert config.chat_template == dataclasses.asdict(resolve("chatml"))
    template = tmp_path / "mine.jinja"
    template.write_text("{% for m in messages %}<<{{ m.role }}>>{{ m.content }}\n{% endfor %}<<assistant>>")
    config = _cluster_config(monkeypatch, [folder, "--chat-template", str(template)])
    assert config.chat_template == {"source": template.read_text(), "origin": "file mine.jinja"}
    assert _cluster_config(monkeypatch, [folder]).chat_template is None  # the folder's own template


def test_a_replica_renders_with_the_template_it_was_given(tiny_exports):
    from edge_infer.serve.cluster import EngineReplica, read_chat_template

    folder = tiny_exports("llama", "fp32")
    reference = edge_infer.load(folder, device="cpu", threads=1, chat_template="gemma")
    own = edge_infer.load(folder, device="cpu", threads=1)
    replica = EngineReplica(str(folder), {"model_id": "tiny"}, {"parallel": 1}, "cpu", 1, True, 0,
                            read_chat_template("gemma"))
    try:
        model = replica.engine.model
        text = model.chat_template.render(MESSAGES, add_generation_prompt=True)
        assert text == reference.chat_template.render(MESSAGES, add_generation_prompt=True)
        assert text != own.chat_template.render(MESSAGES, add_generation_prompt=True)
        assert model.chat_template_origin == "built-in gemma"
    finally:
        replica.engine.begin_shutdown(0.0)
        replica.engine.stop()
