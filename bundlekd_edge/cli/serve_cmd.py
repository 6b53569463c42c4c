"""`bkd-edge serve`: a loaded student behind HTTP (`bundlekd_edge.service`)."""

from __future__ import annotations

import click

from .generate_cmd import engine_options, gpu_layers_option


@click.command()
@engine_options
@gpu_layers_option
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to bind; anything but loopback needs --api-key-env.")  # fmt: skip
@click.option("--port", default=8090, show_default=True, type=click.IntRange(0, 65535))
@click.option("--parallel", default=4, show_default=True, type=click.IntRange(1, 64),
              help="Sessions decoded together on the one loaded model.")  # fmt: skip
@click.option("--queue", default=64, show_default=True, type=click.IntRange(0, 100_000),
              help="Sessions that may wait beyond those; more are answered 429 with Retry-After.")  # fmt: skip
@click.option("--timeout", "timeout_s", default=60.0, show_default=True, type=click.FloatRange(0.1),
              help="Seconds a request may take, queueing included; past it 504, its session cancelled.")  # fmt: skip
@click.option("--api-key-env", default="", metavar="NAME",
              help="Require 'Authorization: Bearer KEY' on all routes but /healthz, KEY in this variable.")  # fmt: skip
@click.option("--max-items", default=200, show_default=True, type=click.IntRange(2), help="Items a session may hold.")
@click.option(
    "--max-bytes", default=1 << 20, show_default=True, type=click.IntRange(1024), help="Bytes a request may hold."
)
def serve(model, pack, adapters, n_ctx, threads, seed, gpu_layers, host, port, parallel, queue, timeout_s, api_key_env,
          max_items, max_bytes):  # fmt: skip
    """Serve bundles over HTTP: POST /v1/bundles, /v1/bundles:batch; GET /v1/models, /healthz, /metrics, /docs.

    \b
      bkd-edge serve --model default --port 8090 &
      curl -s localhost:8090/v1/bundles -d '{"items": [{"id": "A", "title": "..."}, {"id": "B", "title": "..."}]}'

    One model serves every request: up to --parallel sessions decode together (llama.cpp batched
    decoding, the pack's prefix evaluated once). SIGTERM or Ctrl-C stops accepting, answers every
    request already accepted, and exits 0. Access log: JSON lines on stderr (never titles or keys).
    """
    from ..service.app import ServeConfig
    from ..service.app import serve as run

    config = ServeConfig(model, tuple(adapters), str(pack) if pack else None, n_ctx, threads, seed, host, port,
                         parallel, queue, timeout_s, api_key_env, max_items, max_bytes,
                         gpu_layers=gpu_layers)  # fmt: skip

    def loaded(service):
        info = service.model_info
        click.echo(f"bkd-edge serve: {info['student']} ({info['base']['file']}, {len(info['adapters'])} adapter(s), "
                   f"pack {info['pack']}, on {info['device']}) on http://{host}:{port}, {parallel} in parallel, "
                   f"queue {queue}" + (", API key required" if api_key_env else ""), err=True)  # fmt: skip

    run(config, on_loaded=loaded)
