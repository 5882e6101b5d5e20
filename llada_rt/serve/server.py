"""The server process: uvicorn on the app, with SIGTERM meaning drain (stop taking connections, answer every request
in flight, exit 0)."""
from __future__ import annotations

import signal

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
