"""`seglab serve`: flags and entry point (kept free of heavy imports; the parser is built at start)."""

from __future__ import annotations

import argparse
import ipaddress
import logging
import re
import socket
import sys
import warnings
from pathlib import Path
from typing import Any

from seglab.errors import SeglabError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--weights", required=True, metavar="FILE", help="a seglab checkpoint (semantic or detector) or ONNX export"
    )
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=8000, metavar="N", help="port to listen on (default: 8000)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--amp", action="store_true", help="mixed precision (the CPU fast path on CPU)")
    from seglab.cli import add_trust_flag  # here, not at the top: seglab.cli imports this module lazily

    add_trust_flag(p)
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
        help="seconds from a complete upload until the request gives up (default: 30; 504)",
    )
    p.add_argument(
        "--memory-budget-mb",
        type=float,
        default=2048,
        metavar="MB",
        help="memory that uploads and images in flight may hold (default: 2048; else 503, or 413 for an image "
        "too big for all of it)",
    )
    p.add_argument(
        "--body-timeout",
        type=float,
        default=60,
        metavar="SECONDS",
        help="seconds an upload may take to arrive (default: 60; else 408)",
    )
    p.add_argument(
        "--allowed-hosts",
        default="",
        metavar="HOSTS",
        help="more names the server answers to, comma-separated, host or host:port (* for any); by default only "
        "its own address (127.0.0.1, localhost and [::1] at its port on this machine; any name on 0.0.0.0), "
        "else 421",
    )


def run(args: argparse.Namespace) -> int:
    """Check the flags, take the port, load the model, then serve until interrupted."""
    _check_flags(args)
    listener = _listen(args.host, args.port)  # before loading, so a busy port fails in a second
    import uvicorn

    import seglab
    from seglab.serve.app import ServeSettings, create_app

    model = seglab.load(args.weights, device=args.device, amp=args.amp, trust=args.trust_weights)
    _warm_up(model, args.weights)  # before taking requests: a model that cannot run ends the command here
    host, port = listener.getsockname()[:2]
    settings = ServeSettings(
        max_upload_mb=args.max_upload_mb,
        max_side=args.max_side,
        max_batch=args.max_batch,
        batch_wait_ms=args.batch_wait_ms,
        queue_size=args.queue_size,
        timeout=args.timeout,
        memory_budget_mb=args.memory_budget_mb,
        body_timeout=args.body_timeout,
        allowed_hosts=allowed_hosts(_host_list(args.allowed_hosts), host, port),
    )
    _log_to_stderr()
    # a stranger's damaged upload may not write PIL's warnings (corrupt EXIF, odd TIFF tags) into the log
    warnings.filterwarnings("ignore", module=r"PIL\.")
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
        (
            args.memory_budget_mb >= 2 * args.max_upload_mb,
            f"--memory-budget-mb {args.memory_budget_mb:g}: use at least {2 * args.max_upload_mb:g} "
            "(twice --max-upload-mb, so that one upload fits)",
        ),
        (args.body_timeout > 0, f"--body-timeout {args.body_timeout:g}: use a number of seconds above 0"),
        (
            all(HOST_ENTRY.fullmatch(entry) for entry in _host_list(args.allowed_hosts)),
            f"--allowed-hosts {args.allowed_hosts}: list host names or host:port, separated by commas (* for any)",
        ),
    ]
    for ok, message in checks:
        if not ok:
            raise SeglabError(f"serve: {message}")
    if not Path(args.weights).is_file():
        raise SeglabError(f"serve: --weights {args.weights}: file not found; pass a checkpoint such as best.pt")


HOST_ENTRY = re.compile(r"\*|(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9_.-]+)(:[0-9]{1,5})?")


def _host_list(flag: str) -> list[str]:
    return [entry.strip() for entry in flag.split(",") if entry.strip()]


def allowed_hosts(extra: list[str], bound: str, port: int) -> tuple[str, ...] | None:
    """The Host names the server answers: its own address's (loopback: 127.0.0.1, localhost and
    [::1]) at its port, and ``extra``; None (any) for ``*``, or a wildcard bind with no ``extra``."""
    address = ipaddress.ip_address(bound.split("%")[0])
    if "*" in extra or (address.is_unspecified and not extra):
        return None
    if address.is_loopback or address.is_unspecified:
        own = [f"127.0.0.1:{port}", f"localhost:{port}", f"[::1]:{port}"]
    else:
        own = [f"{_url_host(bound)}:{port}"]
    return tuple(own + extra)


def _warm_up(model: Any, weights: str) -> None:
    """One forward pass, or one line saying the model cannot run (and the server never starts)."""
    from seglab.serve.batcher import one_line, warm_up

    try:
        warm_up(model)
    except Exception as e:  # whatever the backend raises: the file is at fault, not the request
        card = model.card
        h, w = card.crop_size or (card.img_size, card.img_size)
        raise SeglabError(
            f"serve: --weights {weights}: the model fails on a blank {w}x{h} image ({one_line(e)}); "
            "check that `seglab predict` runs it, or re-export it"
        ) from None


def _log_to_stderr() -> None:
    """The server's own lines (a failed inference, a dead worker) on stderr, one line each."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger = logging.getLogger("seglab.serve")
    logger.addHandler(handler)
    logger.setLevel(logging.WARNING)
    logger.propagate = False


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
