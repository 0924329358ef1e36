"""`seglab serve`: flags and entry point (kept free of heavy imports; the parser is built at start)."""

from __future__ import annotations

import argparse
import socket
from pathlib import Path

from seglab.errors import SeglabError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--weights", required=True, metavar="FILE", help="a seglab checkpoint or ONNX export")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=8000, metavar="N", help="port to listen on (default: 8000)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--amp", action="store_true", help="mixed precision (the CPU fast path on CPU)")
    p.add_argument(
        "--max-upload-mb", type=float, default=10, metavar="MB", help="largest upload in MB (default: 10; else 413)"
    )
    p.add_argument(
        "--max-side",
        type=int,
        default=4096,
        metavar="PIXELS",
        help="longest image side in pixels (default: 4096; else 413)",
    )
    p.add_argument("--max-batch", type=int, default=8, metavar="N", help="most images in one forward pass (default: 8)")
    p.add_argument(
        "--batch-wait-ms",
        type=float,
        default=5,
        metavar="MS",
        help="how long to wait for more images to batch (default: 5)",
    )
    p.add_argument(
        "--queue-size", type=int, default=64, metavar="N", help="images that may wait (default: 64; else 503)"
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=30,
        metavar="SECONDS",
        help="seconds until a request gives up (default: 30; 504)",
    )


def run(args: argparse.Namespace) -> int:
    """Check the flags, take the port, load the model, then serve until interrupted."""
    _check_flags(args)
    listener = _listen(args.host, args.port)  # before loading, so a busy port fails in a second
    import uvicorn

    import seglab
    from seglab.serve.app import ServeSettings, create_app

    model = seglab.load(args.weights, device=args.device, amp=args.amp)
    if getattr(model, "task", "semantic") != "semantic":
        from seglab.engine.checkpoint import require_semantic

        require_semantic(model.card, args.weights, "serve")
    settings = ServeSettings(
        max_upload_mb=args.max_upload_mb,
        max_side=args.max_side,
        max_batch=args.max_batch,
        batch_wait_ms=args.batch_wait_ms,
        queue_size=args.queue_size,
        timeout=args.timeout,
    )
    host, port = listener.getsockname()[:2]
    print(f"serve: {model.card.arch} ({args.weights}) on http://{_url_host(host)}:{port}/ - Ctrl-C stops", flush=True)
    config = uvicorn.Config(create_app(model, settings), log_level="warning", access_log=False)
    uvicorn.Server(config).run(sockets=[listener])
    return 0


def _check_flags(args: argparse.Namespace) -> None:
    """Every value checked before anything slow happens; each message names its flag."""
    checks = [
        (1 <= args.port <= 65535, f"--port {args.port}: use a port between 1 and 65535"),
        (args.max_upload_mb > 0, f"--max-upload-mb {args.max_upload_mb:g}: use a size above 0"),
        (args.max_side >= 1, f"--max-side {args.max_side}: use 1 pixel or more"),
        (args.max_batch >= 1, f"--max-batch {args.max_batch}: use 1 or more"),
        (args.batch_wait_ms >= 0, f"--batch-wait-ms {args.batch_wait_ms:g}: use 0 or more"),
        (args.queue_size >= 1, f"--queue-size {args.queue_size}: use 1 or more"),
        (args.timeout > 0, f"--timeout {args.timeout:g}: use a number of seconds above 0"),
    ]
    for ok, message in checks:
        if not ok:
            raise SeglabError(f"serve: {message}")
    if not Path(args.weights).is_file():
        raise SeglabError(f"serve: --weights {args.weights}: file not found; pass a checkpoint such as best.pt")


def _listen(host: str, port: int) -> socket.socket:
    """A listening socket for uvicorn, or one line saying why there cannot be one."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
    except socket.gaierror:
        raise SeglabError(f"serve: --host {host}: not an address of this machine; use e.g. 127.0.0.1") from None
    try:
        return socket.create_server((host, port), family=family)
    except OSError as e:
        raise SeglabError(
            f"serve: cannot listen on {host}:{port} ({e.strerror}); choose another --port or stop what uses it"
        ) from None


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host
