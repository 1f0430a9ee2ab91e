"""`aid serve`: options → a local server (serve/) that keeps one backbone loaded → the URL, until Ctrl-C."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer
from rich.markup import escape

from . import options
from .console import err, log


def serve(
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on. The default answers this machine "
                             "only; anything else lets other machines use the page (a warning says so)."),
    port: int = typer.Option(8765, "--port", min=0, max=65535, help="Port (0: any free one; the URL says which)."),
    model: Optional[str] = typer.Option(None, "--model", help="Backbone loaded at start: a .safetensors file or a "
                                        "model name (`aid models list`); default: the embedded one. The page also "
                                        "offers every backbone already in the cache."),
    guidance: Optional[Path] = typer.Option(None, "--guidance", help="AID's guidance module for --model (default: "
                                            "the one shipped or cached for the backbone)."),
    device: str = options.device(),
    precision: options.Precision = options.precision(),
    threads: Optional[int] = options.threads(),
    queue: int = typer.Option(4, "--queue", min=1, max=64, help="Fills that may wait behind the one running; more "
                              "are refused until one finishes."),
    max_upload_mb: float = typer.Option(50, "--max-upload-mb", min=0.001, help="Largest upload, in MB."),
    max_megapixels: float = typer.Option(50, "--max-megapixels", min=0.000001, help="Largest image or mask, in "
                                         "millions of pixels (checked before decoding)."),
    allow_host: Optional[List[str]] = typer.Option(None, "--allow-host", help="Another name this server answers to "
                                                   "in the Host header (e.g. behind a proxy); repeatable."),
    open_browser: bool = typer.Option(False, "--open", help="Open the page in the default browser."),
    cache_dir: Optional[Path] = options.cache_dir(),
    offline: bool = options.offline(),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log every request on stderr."),
):
    """Serve a local web page: open an image, paint the part to fill with a brush, fill it, compare methods and
    seeds side by side, download the PNG.

    Fills run one at a time, on the same library path as `aid inpaint` (same image, mask, model, method and seed:
    the same pixels), with the backbone kept loaded between them. The page and everything it loads come from the
    package: it works offline. Only this machine can reach it unless --host says otherwise.

    Examples:
      [bold]aid serve[/]                                 (http://127.0.0.1:8765/)
      [bold]aid serve --port 0 --open[/]                 (a free port, opened in the browser)
      [bold]aid serve --model edm-ffhq-64 --threads 2[/]
    """
    precision = options.value(precision)
    from ..serve.server import is_loopback, make_server
    from ..threads import apply_threads

    apply_threads(threads)
    server = make_server(model=model, guidance=guidance, host=host, port=port, device=device, precision=precision,
                         cache=cache_dir, offline=offline, queue_length=queue,
                         max_bytes=int(max_upload_mb * 1e6), max_pixels=int(max_megapixels * 1e6),
                         threads=threads, allow_hosts=tuple(allow_host or ()), log=log, quiet_requests=not verbose)
    if not is_loopback(host):
        err.print(f"[bold yellow]warning:[/] listening on {escape(host)}: other machines on the network can use "
                  f"this page and its compute; the default, --host 127.0.0.1, answers this machine only",
                  soft_wrap=True)
    err.print(f"aid serve: {server.url} (Ctrl-C stops it)", soft_wrap=True)
    print(server.url, flush=True)  # on stdout too, for scripts
    if open_browser:
        import webbrowser

        webbrowser.open(server.url)
    import signal

    def terminate(signum, frame):  # `kill` and service managers stop it as Ctrl-C does
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, terminate)
    try:
        server.serve_forever(poll_interval=0.25)
    except KeyboardInterrupt:
        pass
    finally:  # serve_forever has returned: stop the fills (the one under way gives up) and free the port
        server.engine.stop(wait=5)
        server.server_close()
    err.print("aid serve: stopped")
