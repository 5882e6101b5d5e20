"""Running the app: the server process (uvicorn, with SIGTERM meaning drain: stop taking connections, answer every
request in flight, exit 0), or uvicorn in a thread of this process (tests, benchmarks, notebooks)."""
from __future__ import annotations

import contextlib
import signal
import socket
import threading
import time

from .app import create_app
from .protocol import ServeSettings


def run(rt, settings: ServeSettings, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info") -> None:
    """Serves until SIGTERM or Ctrl-C. uvicorn closes the listening socket and waits for open responses (no
    timeout), then the app's shutdown waits for the engine thread."""
    import uvicorn

    app = create_app(rt, settings)
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, lifespan="on",
                            timeout_graceful_shutdown=None)
    server = uvicorn.Server(config)
    # uvicorn handles SIGTERM while it serves, then re-raises it once it is done; after the drain the process has
    # finished its work, so that re-raise must not kill it with status 143 (and one during startup still stops it).
    def on_term(signum, frame):
        server.should_exit = True

    previous = signal.signal(signal.SIGTERM, on_term)
    try:
        server.run()
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def in_thread(app, host: str = "127.0.0.1", port: int = 0, start_timeout_s: float = 60.0):
    """Serves `app` from a thread of this process on host:port (0: a free port); yields the base URL. On exit the
    server drains as on SIGTERM."""
    import uvicorn

    sock = socket.socket()
    sock.bind((host, port))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on", timeout_graceful_shutdown=None))
    thread = threading.Thread(target=server.run, kwargs=dict(sockets=[sock]), name="llada-rt-uvicorn", daemon=True)
    thread.start()
    t0 = time.monotonic()
    try:
        while not server.started:
            if not thread.is_alive() or time.monotonic() - t0 > start_timeout_s:
                raise RuntimeError(f"the server did not start on {host}:{sock.getsockname()[1]}")
            time.sleep(0.02)
        yield f"http://{host}:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join()
        sock.close()
