"""The ASGI app (Starlette): the OpenAI-compatible endpoints, server-sent events, /health and /metrics, over one
Scheduler that owns the engine thread."""
from __future__ import annotations

import asyncio
import contextlib
import json
import time

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from .metrics import Metrics
from .protocol import APIError, ServeSettings, chunk, parse_request, response, usage_chunk
from .scheduler import Failed, Finished, Job, Scheduler, Update

ENDPOINT = {"completion": "completions", "chat": "chat"}   # metrics label per request kind


def error_response(e: APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"


async def _read_json(request: Request):
    raw = await request.body()
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise APIError(400, f"the request body is not valid JSON ({e}); send a JSON object with "
                            "Content-Type: application/json", code="invalid_json") from None


async def _generate(request: Request, kind: str) -> Response:
    st = request.app.state
    try:
        spec = parse_request(kind, await _read_json(request), st.runtime, st.settings)
        job = st.scheduler.submit(spec, ENDPOINT[kind])
    except APIError as e:
        st.metrics.requests.labels(ENDPOINT[kind], "rejected" if e.status in (429, 503) else "invalid").inc()
        return error_response(e)
    if spec.stream:
        return StreamingResponse(_stream(job, st.scheduler), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    return await _answer(job, request, st.scheduler)


async def _until_end(job: Job):
    while True:
        item = await job.updates.get()
        if isinstance(item, (Finished, Failed)):
            return item


async def _disconnect(request: Request) -> None:
    """Returns when the client closes the connection (the body has been read, so only http.disconnect comes)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _answer(job: Job, request: Request, scheduler: Scheduler) -> Response:
    """The non-streamed answer; a client that disconnects first cancels the job."""
    end = asyncio.ensure_future(_until_end(job))
    gone = asyncio.ensure_future(_disconnect(request))
    try:
        await asyncio.wait({end, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        answered = end.done()
        if not answered:
            end.cancel()
            scheduler.cancel(job)
    if not answered:
        return Response(status_code=499)   # nobody reads it: the client is gone
    item = end.result()
    if isinstance(item, Failed):
        return error_response(item.error)
    return JSONResponse(response(job.spec, job.texts, job.finish_reasons, item.completion_tokens))


async def _stream(job: Job, scheduler: Scheduler):
    """Server-sent events: per choice, deltas of newly stable text, then its finish_reason; the usage chunk when
    asked for; data: [DONE]. Starlette cancels this generator when the client disconnects, which cancels the job."""
    spec = job.spec
    try:
        if spec.kind == "chat":
            for c in spec.choices:
                yield _sse(chunk(spec, c.index, None, None, role=True))
        while True:
            item = await job.updates.get()
            if isinstance(item, Update):
                if item.delta or item.canvas is not None:
                    yield _sse(chunk(spec, item.index, item.delta, None, item.canvas, item.nfe))
                if item.finish_reason is not None:
                    yield _sse(chunk(spec, item.index, None, item.finish_reason))
            elif isinstance(item, Finished):
                if spec.include_usage:
                    yield _sse(usage_chunk(spec, item.completion_tokens))
                yield "data: [DONE]\n\n"
                return
            else:
                yield _sse(item.error.body())
                return
    finally:
        scheduler.cancel(job)   # a no-op unless the job is still running (the client went away)


async def completions(request: Request) -> Response:
    return await _generate(request, "completion")


async def chat_completions(request: Request) -> Response:
    return await _generate(request, "chat")


def _model_card(st) -> dict:
    return {"id": st.settings.model_name, "object": "model", "created": st.created, "owned_by": "llada_rt",
            "max_model_len": st.runtime.config.max_sequence_length}


async def models(request: Request) -> Response:
    return JSONResponse({"object": "list", "data": [_model_card(request.app.state)]})


async def model(request: Request) -> Response:
    st = request.app.state
    name = request.path_params["name"]
    if name != st.settings.model_name:
        return error_response(APIError(404, f"the model {name!r} does not exist; this server serves "
                                            f"{st.settings.model_name!r}", param="model", code="model_not_found"))
    return JSONResponse(_model_card(st))


async def health(request: Request) -> Response:
    st = request.app.state
    s = st.scheduler
    body = {"status": "stopping" if s.stopping else "ok", "model": st.settings.model_name,
            "rows_in_flight": s.rows_in_flight, "queue_depth": s.queue_depth, "max_rows": s.max_rows,
            "max_queue": s.max_queue}
    return JSONResponse(body, status_code=503 if s.stopping else 200)


async def metrics(request: Request) -> Response:
    m: Metrics = request.app.state.metrics
    return Response(m.render(), media_type=m.content_type)


async def _http_error(request: Request, exc: HTTPException) -> Response:
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
    what = f"{request.method} {request.url.path}"
    return error_response(APIError(exc.status_code, f"{what}: {exc.detail}", code=code))


async def _server_error(request: Request, exc: Exception) -> Response:
    return error_response(APIError(500, f"internal error: {type(exc).__name__}: {exc}", code="server_error"))


def create_app(rt, settings: ServeSettings, engine_thread: bool = True) -> Starlette:
    """The server's ASGI app over a loaded Runtime. engine_thread: the engine loop runs on a thread of its own from
    startup to shutdown (lifespan); False: the caller runs it (app.state.scheduler.run_here()) and the shutdown
    stops it."""
    st_metrics = Metrics()
    scheduler = Scheduler(rt, settings.max_rows, settings.max_queue, st_metrics)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        if engine_thread:
            scheduler.start()
        try:
            yield
        finally:
            await asyncio.to_thread(scheduler.stop)

    routes = [
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/v1/models/{name:path}", model, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
    ]
    app = Starlette(routes=routes, lifespan=lifespan,
                    exception_handlers={HTTPException: _http_error, Exception: _server_error})
    app.state.runtime, app.state.settings, app.state.metrics, app.state.scheduler = rt, settings, st_metrics, scheduler
    app.state.created = int(time.time())
    return app
