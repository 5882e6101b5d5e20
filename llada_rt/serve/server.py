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
    """Serves until SIGTERM or Ctrl-C (a second Ctrl-C stops without waiting). uvicorn closes the listening socket
    and waits for open responses (no timeout), then the app's shutdown stops the engine loop.

    The engine loop runs on this thread (the one that loaded the model) and uvicorn on another: see
    scheduler.py for why the engine must not run on a second thread next to the one that loaded it. Ctrl-C ends
    with KeyboardInterrupt once drained; a failure to start (the port is taken) is raised here."""
    import uvicorn

    app = create_app(rt, settings, engine_thread=False)
    scheduler = app.state.scheduler
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, lifespan="on",
                            timeout_graceful_shutdown=None)
    server = uvicorn.Server(config)
    failure: list[BaseException] = []
    interrupted: list[int] = []

    def http() -> None:
        try:
            server.run()                        # not the main thread: uvicorn installs no signal handlers
        except BaseException as e:             # e.g. SystemExit(1) when the port is taken
            failure.append(e)
        finally:
            scheduler.stop()                    # the engine loop returns (also when startup failed)

    def on_signal(signum, frame):
        if signum == signal.SIGINT:
            if interrupted:
                server.force_exit = True
            interrupted.append(signum)
        server.should_exit = True

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    thread = threading.Thread(target=http, name="llada-rt-http")
    thread.start()
    try:
        scheduler.run_here()
    finally:
        server.should_exit = True               # the engine loop failed: stop serving too
        thread.join()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if failure and not (isinstance(failure[0], SystemExit) and not failure[0].code):
        raise failure[0]
    if interrupted:
        raise KeyboardInterrupt


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
