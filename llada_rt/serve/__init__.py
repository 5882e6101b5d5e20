"""`llada-rt serve`: an OpenAI-compatible HTTP server on the engine (needs the serve extra: starlette, uvicorn,
prometheus-client). protocol: the wire format; text: stable text per choice; scheduler: the engine thread; metrics:
Prometheus series; app: the ASGI endpoints; server: the process."""
from .app import create_app
from .protocol import ServeSettings
from .server import in_thread, run

__all__ = ["create_app", "in_thread", "run", "ServeSettings"]
