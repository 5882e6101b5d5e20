"""`llada-rt serve` driven by the official openai client on 127.0.0.1: every answer (JSON or streamed, completions
or chat, with stop strings, max_tokens, n, under concurrent load) equals what Runtime.generate gives for the request
alone on a separate Runtime; error statuses with OpenAI's error body; a disconnect mid-stream frees the row; the
queue's 429; metrics that count; SIGTERM drains (the CLI in a subprocess, on the shipped model)."""
import asyncio
import contextlib
import http.client
import json
import os
import re
import signal
import socket
import subprocess
import tempfile
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlsplit

import openai
import pytest
import torch

from llada_rt import Runtime
from llada_rt.runtime import SHIPPED_MODEL
from llada_rt.serve import ServeSettings, create_app, in_thread
from llada_rt.serve.metrics import Metrics
from llada_rt.serve.protocol import APIError, parse_request
from llada_rt.serve.scheduler import Scheduler, Update
from llada_rt.testing import write_checkpoint

BACKEND = "ops"
VOCAB = 111         # printable characters + [UNK] + LLaDA's specials: every id decodes to visible text or nothing
MODEL = "small"     # the shipped model: real answers (EOS, chat template) at the cost of a tiny random one
DEFAULTS = {"block_length": 8}


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """The test machines' cores are shared: torch's thread pool spinning on a busy core is 10-50x slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def ckpt():
    return SHIPPED_MODEL


@pytest.fixture(scope="module")
def long_ckpt(tmp_path_factory):
    """A tiny random model whose EOS/EOT logits are 0: its answers run to the last position (long requests to cancel
    or to fill the queue with)."""
    return write_checkpoint(tmp_path_factory.mktemp("long"), seed=4, vocab=VOCAB, eos_scale=0.0)


@pytest.fixture(scope="module")
def ref(ckpt):
    """The oracle: a Runtime of its own, so a request really runs alone there."""
    return Runtime(ckpt, device="cpu", dtype=torch.float32, backend=BACKEND)


@contextlib.contextmanager
def serving(ckpt, max_rows=4, max_queue=16, defaults=None, max_tokens=16):
    """The app on a free loopback port in a thread of this process; yields (base_url, app)."""
    rt = Runtime(ckpt, device="cpu", dtype=torch.float32, backend=BACKEND, max_rows=max_rows)
    settings = ServeSettings(model_name=MODEL, max_rows=max_rows, max_queue=max_queue,
                             defaults=dict(DEFAULTS if defaults is None else defaults), max_tokens=max_tokens)
    app = create_app(rt, settings)
    with in_thread(app) as base_url:
        yield base_url, app


@pytest.fixture(scope="module")
def server(ckpt):
    with serving(ckpt) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key="unused", max_retries=0, timeout=120)


def solo(ref, prompt_ids, max_tokens, stop=(), **options):
    """What Runtime.generate gives for the request alone: text cut at max_tokens tokens and at the earliest stop
    string; (text, finish_reason, completion_tokens)."""
    block = options.get("block_length", DEFAULTS["block_length"])
    gen_length = -(-max_tokens // block) * block
    res = ref.generate(prompt_ids, gen_length=gen_length, block_length=block, **options)
    ids = res.token_ids[0]
    answer = res.canvas[0, res.prompt_len:].tolist()
    cut = len(ids) >= max_tokens
    text = ref.tokenizer.decode(ids[:max_tokens])
    hits = [i for s in stop if (i := text.find(s)) >= 0]
    if hits:
        return text[:min(hits)], "stop", None
    stop_id = len(ids) < len(answer)
    return text, "length" if cut or not stop_id else "stop", min(len(ids), max_tokens)


def completion_ids(ref, prompt):
    return ref.tokenizer.encode(prompt)


def chat_ids(ref, messages):
    return ref.tokenizer.encode_chat(messages)


def call(base_url, method, path, body=None, raw=None, timeout=120):
    """A plain HTTP request (the stdlib's client: raw bodies, any status); returns (status, headers, body bytes)."""
    u = urlsplit(base_url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=timeout)
    try:
        data = raw if raw is not None else None if body is None else json.dumps(body).encode()
        conn.request(method, path, body=data, headers={"Content-Type": "application/json"} if data else {})
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def call_json(base_url, method, path, body=None, **kw):
    status, _, data = call(base_url, method, path, body, **kw)
    return status, json.loads(data)


def metric(base_url, name, **labels) -> float:
    text = call(base_url, "GET", "/metrics")[2].decode()
    sel = ",".join(f'{k}="{v}"' for k, v in labels.items())
    pat = re.escape(name) + (r"\{" + re.escape(sel) + r"\}" if sel else "") + r" (\S+)"
    m = re.search("^" + pat + "$", text, re.M)
    assert m, f"{name}{{{sel}}} not in /metrics"
    return float(m.group(1))


# raw text (completions have no chat template): the shipped model answers some with EOS early, some with 16 chars
PROMPTS = ["hello", "Sort the list: 5 2 9 2", "What is the capital of France?", "x", "Reverse the string: qwxk"]
OPTIONS = [
    dict(),
    dict(mode="dual", threshold=0.3),
    dict(mode="prefix", temperature=0.9, seed=7),
    dict(temperature=0.7, seed=3, remasking="random", steps=8),
    dict(mode="exact", factor=1.0, early_stop=True),
]


@pytest.mark.parametrize("k", range(len(OPTIONS)))
def test_completion_equals_solo(ref, client, k):
    opts = OPTIONS[k]
    for prompt, max_tokens in zip(PROMPTS[k:] + PROMPTS[:k], (5, 16, 11, 8, 3)):
        want = solo(ref, completion_ids(ref, prompt), max_tokens, **opts)
        r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=max_tokens,
                                      temperature=opts.get("temperature"), seed=opts.get("seed"),
                                      extra_body={k2: v for k2, v in opts.items() if k2 not in ("temperature", "seed")})
        got = r.choices[0]
        print(opts, repr(prompt), max_tokens, "server", repr(got.text), got.finish_reason, "solo", want)
        assert (got.text, got.finish_reason) == want[:2]
        assert r.usage.completion_tokens == want[2]
        assert r.usage.prompt_tokens == len(completion_ids(ref, prompt))
        assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
        assert r.object == "text_completion" and r.model == MODEL


def test_chat_equals_solo_and_stream_joins_to_it(ref, client):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "Sort the list: 5 2 9 2"},
                {"role": "assistant", "content": "2 2 5 9"}, {"role": "user", "content": "Sort the list: 8 1 3"}]
    for opts in (dict(), dict(mode="dual", threshold=0.5), dict(temperature=1.2, seed=12)):
        want = solo(ref, chat_ids(ref, messages), 13, **opts)
        kw = dict(model=MODEL, messages=messages, max_tokens=13, temperature=opts.get("temperature"),
                  seed=opts.get("seed"), extra_body={k: v for k, v in opts.items() if k not in ("temperature", "seed")})
        r = client.chat.completions.create(**kw)
        parts, finish, usage, roles = [], [], None, []
        for ch in client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw):
            if ch.usage is not None:
                usage = ch.usage
                assert ch.choices == []
                continue
            d = ch.choices[0].delta
            roles += [d.role] if d.role else []
            parts.append(d.content or "")
            finish.append(ch.choices[0].finish_reason)
        print(opts, "json", repr(r.choices[0].message.content), "stream", parts, "solo", want)
        assert (r.choices[0].message.content, r.choices[0].finish_reason) == want[:2]
        assert r.choices[0].message.role == "assistant" and r.object == "chat.completion"
        assert "".join(parts) == r.choices[0].message.content
        assert roles == ["assistant"] and [f for f in finish if f] == [r.choices[0].finish_reason]
        assert finish[-1] == r.choices[0].finish_reason
        assert usage.completion_tokens == r.usage.completion_tokens == want[2]
        assert usage.prompt_tokens == r.usage.prompt_tokens == len(chat_ids(ref, messages))


def _sse_lines(base_url, body):
    status, headers, data = call(base_url, "POST", "/v1/completions", body)
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    return [line for line in data.decode().split("\n") if line]


def test_stream_wire_format_and_deltas_are_stable_text(ref, server):
    """Raw SSE: data lines, [DONE] last; each delta extends the text, never takes back, and joins to the JSON answer
    and to the solo text."""
    base = server[0]
    for prompt, max_tokens in (("Reverse the string: qwxk", 24), ("abc", 7)):
        body = dict(model=MODEL, prompt=prompt, max_tokens=max_tokens, stream=True, steps=24 if max_tokens == 24
                    else None)
        lines = _sse_lines(base, body)
        assert all(line.startswith("data: ") for line in lines) and lines[-1] == "data: [DONE]"
        chunks = [json.loads(line[6:]) for line in lines[:-1]]
        texts = [c["choices"][0]["text"] for c in chunks]
        reasons = [c["choices"][0]["finish_reason"] for c in chunks]
        want = solo(ref, completion_ids(ref, prompt), max_tokens,
                    **({"steps": 24} if max_tokens == 24 else {}))
        print(prompt, "deltas", texts, reasons, "solo", want)
        assert "".join(texts) == want[0] and reasons[-1] == want[1] and reasons[:-1] == [None] * (len(reasons) - 1)
        assert all(t for t in texts[:-1])   # without the canvas extension a chunk is sent only with new text
        assert all(c["object"] == "text_completion" and c["id"] == chunks[0]["id"] for c in chunks)
        non_stream = call_json(base, "POST", "/v1/completions", {**body, "stream": False})[1]
        assert non_stream["choices"][0]["text"] == want[0]


def test_canvas_extension_shows_each_step(ref, client):
    prompt, max_tokens = "hello world", 16
    want = solo(ref, completion_ids(ref, prompt), max_tokens)
    res = ref.generate(completion_ids(ref, prompt), gen_length=16, block_length=8)
    steps, text = [], ""
    for ch in client.completions.create(model=MODEL, prompt=prompt, max_tokens=max_tokens, stream=True,
                                        extra_body={"llada_canvas": True}):
        c = ch.choices[0]
        text += c.text
        if c.model_extra.get("llada"):
            steps.append(c.model_extra["llada"])
    masks = [s["canvas"].count("\u2591") for s in steps]
    print("nfe", [s["nfe"] for s in steps], "masks", masks, "solo nfe", res.nfe)
    assert [s["nfe"] for s in steps] == list(range(1, len(steps) + 1)) and len(steps) <= res.nfe
    assert masks == sorted(masks, reverse=True) and text == want[0]
    assert steps[-1]["canvas"].replace("\u2591", "").startswith(want[0])


def test_stop_strings_cut_committed_text(ref, client):
    # a completion prompt written in the chat template (special tokens as text), so the model answers at length
    prompt = ref.tokenizer.decode(chat_ids(ref, [{"role": "user", "content": "Sort the list: 9 3 7 1 8 2"}]),
                                  skip_special_tokens=False)
    max_tokens = 24
    full = solo(ref, completion_ids(ref, prompt), max_tokens, steps=24)[0]
    assert len(full) >= 6, f"the model's answer {full!r} is too short to pick stop strings from"
    cases = [[full[3:5]], [full[-2:], full[4]], ["\u00e9\u00e9 never"], [full[1:4], full[2:3] + "#"]]
    for stop in cases:
        want = solo(ref, completion_ids(ref, prompt), max_tokens, stop=stop, steps=24)
        kw = dict(model=MODEL, prompt=prompt, max_tokens=max_tokens, stop=stop, extra_body={"steps": 24})
        r = client.completions.create(**kw)
        streamed = "".join(ch.choices[0].text for ch in client.completions.create(stream=True, **kw))
        print(stop, "full", repr(full), "server", repr(r.choices[0].text), r.choices[0].finish_reason, "solo", want)
        assert (r.choices[0].text, r.choices[0].finish_reason) == want[:2] and streamed == want[0]
        if want[1] == "stop" and want[2] is None:   # cut by a stop string: tokens up to its end
            assert len(want[0]) < r.usage.completion_tokens <= max_tokens


def test_n_and_prompt_lists(ref, client):
    prompts = ["abc", "hello world"]
    r = client.completions.create(model=MODEL, prompt=prompts, n=2, max_tokens=9, temperature=1.0, seed=40)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    total = 0
    for c in r.choices:
        p, j = prompts[c.index // 2], c.index % 2
        want = solo(ref, completion_ids(ref, p), 9, temperature=1.0, seed=40 + j)
        print(c.index, repr(c.text), c.finish_reason, want)
        assert (c.text, c.finish_reason) == want[:2]
        total += want[2]
    assert r.usage.completion_tokens == total
    assert r.usage.prompt_tokens == sum(len(completion_ids(ref, p)) for p in prompts)
    ids = completion_ids(ref, "token ids")
    r = client.completions.create(model=MODEL, prompt=ids, max_tokens=6)
    assert r.choices[0].text == solo(ref, ids, 6)[0]


def test_models_and_health(server, client):
    base, app = server
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")
    h = call_json(base, "GET", "/health")[1]
    assert h["status"] == "ok" and h["max_rows"] == 4 and h["rows_in_flight"] == 0


BAD = [
    (dict(top_p=0.5), "top_p"), (dict(logprobs=2), "logprobs"), (dict(frequency_penalty=0.5), "frequency_penalty"),
    (dict(tools=[{"type": "function", "function": {"name": "f"}}]), "tools"), (dict(echo=True), "echo"),
    (dict(gen_length=32), "gen_length"), (dict(foo=1), "foo"), (dict(max_tokens=0), "max_tokens"),
    (dict(max_tokens="5"), "max_tokens"), (dict(max_tokens=600), "max_tokens"), (dict(temperature=-1), "temperature"),
    (dict(mode="fastest"), "mode"), (dict(threshold=2.0), "threshold"), (dict(steps=5), "steps"),
    (dict(block_length=0), "block_length"), (dict(n=0), "n"), (dict(n=100), "n"), (dict(stop=""), "stop"),
    (dict(stop=[1]), "stop"), (dict(stream_options={"include_usage": True}), "stream_options"),
    (dict(prompt=[]), "prompt"), (dict(prompt=[[]]), "prompt"), (dict(prompt=[1, 10 ** 6]), "prompt"),
    (dict(prompt="a <|mdm_mask|> b"), "prompt"), (dict(early_stop="yes"), "early_stop"), (dict(seed=-1), "seed"),
    (dict(cfg_scale=1.0, mode="dual"), "cfg_scale"), (dict(cuda_graph=True), "cuda_graph"),
    (dict(remasking="random", threshold=0.5), "threshold"), (dict(model=None), "model"),
]


@pytest.mark.parametrize("extra,param", BAD, ids=[p for _, p in BAD])
def test_bad_completion_requests_are_400_naming_the_field(server, extra, param):
    body = {"model": MODEL, "prompt": "abc", **extra}
    body = {k: v for k, v in body.items() if v is not None}
    status, out = call_json(server[0], "POST", "/v1/completions", body)
    err = out["error"]
    print(extra, status, err)
    assert status == 400 and err["param"] == param and err["type"] == "invalid_request_error"
    assert set(err) == {"message", "type", "param", "code"} and param in err["message"]


BAD_CHAT = [
    (dict(messages=[]), "messages"), (dict(messages="hi"), "messages"),
    (dict(messages=[{"role": "tool", "content": "x"}]), "messages[0].role"),
    (dict(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]),
     "messages[0].content"),
    (dict(messages=[{"role": "user", "content": "x", "tool_calls": []}]), "messages[0]"),
    (dict(max_tokens=4, max_completion_tokens=4), "max_completion_tokens"),
    (dict(response_format={"type": "json_object"}), "response_format"),
]


@pytest.mark.parametrize("extra,param", BAD_CHAT, ids=[p for _, p in BAD_CHAT])
def test_bad_chat_requests_are_400_naming_the_field(client, extra, param):
    kw = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], **extra}
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(**kw)
    print(extra, e.value.status_code, e.value.body)
    assert e.value.status_code == 400 and e.value.body["param"] == param


def test_other_error_statuses(server, client):
    base = server[0]
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="gpt-4", prompt="x")
    assert e.value.body["code"] == "model_not_found" and e.value.body["param"] == "model"
    nan = b'{"model": "small", "prompt": "x", "temperature": NaN}'   # Python's json reads NaN
    status, out = call_json(base, "POST", "/v1/completions", raw=nan)
    assert status == 400 and out["error"]["param"] == "temperature"
    status, out = call_json(base, "POST", "/v1/completions", raw=b"{not json")
    print(status, out)
    assert status == 400 and out["error"]["code"] == "invalid_json"
    assert call_json(base, "POST", "/v1/completions", [1, 2])[0] == 400
    status, out = call_json(base, "GET", "/v1/completions")
    assert status == 405 and set(out["error"]) == {"message", "type", "param", "code"}
    status, out = call_json(base, "POST", "/v1/embeddings", {})
    assert status == 404 and out["error"]["code"] == "not_found"


def test_chat_on_a_base_model_is_400(tmp_path):
    base_ckpt = write_checkpoint(tmp_path / "base", seed=1, vocab=VOCAB, chat=False)
    with serving(base_ckpt) as (base, _):
        c = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0)
        with pytest.raises(openai.BadRequestError) as e:
            c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}])
        print(e.value.body)
        assert e.value.body["code"] == "model_not_chat"
        assert c.completions.create(model=MODEL, prompt="hi", max_tokens=4).choices[0].finish_reason


def _long_stream(client, **kw):
    return client.completions.create(model=MODEL, prompt="hello world", max_tokens=256, stream=True,
                                     extra_body={"steps": 256, "llada_canvas": True}, **kw)


def test_a_request_joins_at_the_next_step_without_waiting(ref, long_ckpt):
    """A short request sent while a long one is denoising is answered while the long one is still in flight."""
    with serving(long_ckpt, max_rows=2) as (base, app):
        c = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=120)
        long = _long_stream(c)
        it = iter(long)
        next(it)
        r = c.completions.create(model=MODEL, prompt="abc", max_tokens=4)
        (req,) = app.state.runtime.engine.active
        print("short answered while the long request is at nfe", req.nfe, "of", req.config.total_steps)
        assert r.choices[0].finish_reason and 0 < req.nfe < req.config.total_steps == 256
        long.close()


def test_full_queue_is_429_with_retry_after(long_ckpt):
    with serving(long_ckpt, max_rows=1, max_queue=1) as (base, app):
        c = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=120)
        first = _long_stream(c)
        next(iter(first))                 # in flight
        second = _long_stream(c)          # queued
        with pytest.raises(openai.RateLimitError) as e:
            c.completions.create(model=MODEL, prompt="x", max_tokens=4)
        print(e.value.status_code, e.value.response.headers.get("retry-after"), e.value.body)
        assert int(e.value.response.headers["retry-after"]) >= 1 and e.value.body["code"] == "queue_full"
        assert metric(base, "llada_rt_queue_depth") == 1
        assert metric(base, "llada_rt_requests_total", endpoint="completions", outcome="rejected") == 1
        first.close()
        second.close()


def test_disconnect_mid_stream_frees_the_row(long_ckpt):
    with serving(long_ckpt, max_rows=2) as (base, app):
        sched = app.state.scheduler
        jobs = []
        submit = sched.submit
        sched.submit = lambda spec, endpoint: jobs.append(submit(spec, endpoint)) or jobs[-1]
        c = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=120)
        stream = _long_stream(c)
        it = iter(stream)
        for _ in range(3):
            next(it)
        stream.close()
        t0 = time.monotonic()
        while sched.rows_in_flight and time.monotonic() - t0 < 30:
            time.sleep(0.01)
        (job,) = jobs
        req = job.rows[0].req
        print("cancelled at nfe", job.cancel_nfe, "freed at nfe", req.nfe, "of", req.config.total_steps)
        assert job.state == "cancelled" and req.cancelled and req.nfe < req.config.total_steps
        assert sched.rows_in_flight == 0 and app.state.runtime.engine.active == []
        assert metric(base, "llada_rt_requests_total", endpoint="completions", outcome="cancelled") == 1
        assert metric(base, "llada_rt_rows_in_flight") == 0
        # the server goes on
        assert c.completions.create(model=MODEL, prompt="abc", max_tokens=5).choices[0].finish_reason


def test_non_streamed_disconnect_cancels(long_ckpt):
    with serving(long_ckpt, max_rows=2) as (base, app):
        sched = app.state.scheduler
        with pytest.raises(TimeoutError):
            call(base, "POST", "/v1/completions", dict(model=MODEL, prompt="hi", max_tokens=256, steps=256),
                 timeout=0.5)
        t0 = time.monotonic()
        while metric(base, "llada_rt_requests_total", endpoint="completions", outcome="cancelled") < 1:
            assert time.monotonic() - t0 < 30, "the disconnect was not seen"
            time.sleep(0.05)
        while sched.rows_in_flight and time.monotonic() - t0 < 30:
            time.sleep(0.01)
        assert sched.rows_in_flight == 0 and app.state.runtime.engine.active == []


def test_a_failed_engine_step_is_500_and_the_server_goes_on(long_ckpt):
    with serving(long_ckpt) as (base, app):
        rt = app.state.runtime
        step, fails = rt.step, [2]

        def flaky():
            if fails[0]:
                fails[0] -= 1
                raise RuntimeError("device lost")
            return step()

        rt.step = flaky
        c = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=120)
        with pytest.raises(openai.InternalServerError) as e:
            c.completions.create(model=MODEL, prompt="abc", max_tokens=4)
        print(e.value.body)
        assert e.value.body["code"] == "engine_error" and "device lost" in e.value.body["message"]
        with pytest.raises(openai.APIError) as e:   # streamed: an error event ends the stream
            list(c.completions.create(model=MODEL, prompt="abc", max_tokens=4, stream=True))
        assert "device lost" in str(e.value)
        assert c.completions.create(model=MODEL, prompt="abc", max_tokens=4).choices[0].finish_reason == "length"
        assert metric(base, "llada_rt_requests_total", endpoint="completions", outcome="error") == 2
        assert app.state.scheduler.rows_in_flight == 0


def test_cancel_frees_the_row_within_one_step(long_ckpt):
    """The scheduler alone: cancel() while the engine steps; the row's NFE grows by at most the step in flight."""
    rt = Runtime(long_ckpt, device="cpu", dtype=torch.float32, backend=BACKEND, max_rows=2)
    settings = ServeSettings(model_name=MODEL, max_rows=2, max_queue=2, defaults=dict(DEFAULTS), max_tokens=256)
    sched = Scheduler(rt, 2, 2, Metrics())
    sched.start()

    async def go():
        spec = parse_request("completion", dict(model=MODEL, prompt="abc", steps=256, llada_canvas=True), rt,
                             settings)
        job = sched.submit(spec, "completions")
        for _ in range(2):
            assert isinstance(await job.updates.get(), Update)
        sched.cancel(job)
        return job

    try:
        job = asyncio.run(go())
        t0 = time.monotonic()
        while sched.rows_in_flight and time.monotonic() - t0 < 30:
            time.sleep(0.001)
        req = job.rows[0].req
        print("cancel at nfe", job.cancel_nfe, "freed at", req.nfe)
        assert req.cancelled and req.nfe <= job.cancel_nfe[0] + 1 and rt.engine.active == []
    finally:
        sched.stop()
    with pytest.raises(APIError) as e:
        asyncio.run(_submit(sched, spec_for(rt, settings)))
    assert e.value.status == 503


def spec_for(rt, settings):
    return parse_request("completion", dict(model=MODEL, prompt="abc", max_tokens=4), rt, settings)


async def _submit(sched, spec):
    return sched.submit(spec, "completions")


def test_concurrent_load_equals_solo_and_metrics_count(ref, ckpt):
    """16 clients x 4 requests (mixed modes, sampling, lengths, streams) against 6 rows: every request answered, each
    equal to its solo result; metrics count them."""
    clients, per_client = 16, 4
    jobs = []
    for c in range(clients):
        for j in range(per_client):
            i = c * per_client + j
            opts = dict(OPTIONS[i % len(OPTIONS)])
            if "seed" in opts:
                opts["seed"] += i
            jobs.append(dict(prompt=PROMPTS[i % len(PROMPTS)] + "!" * (i % 3), max_tokens=(3, 8, 13, 16)[i % 4],
                             stream=i % 2 == 1, opts=opts))
    with serving(ckpt, max_rows=6, max_queue=64) as (base, app):
        def run_client(c):
            client = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=300)
            out = []
            for job in jobs[c * per_client:(c + 1) * per_client]:
                o = job["opts"]
                kw = dict(model=MODEL, prompt=job["prompt"], max_tokens=job["max_tokens"],
                          temperature=o.get("temperature"), seed=o.get("seed"),
                          extra_body={k: v for k, v in o.items() if k not in ("temperature", "seed")})
                if job["stream"]:
                    chunks = list(client.completions.create(stream=True, **kw))
                    out.append(("".join(ch.choices[0].text for ch in chunks), chunks[-1].choices[0].finish_reason))
                else:
                    r = client.completions.create(**kw)
                    out.append((r.choices[0].text, r.choices[0].finish_reason))
            return out

        t0 = time.monotonic()
        with ThreadPoolExecutor(clients) as pool:
            futures = [pool.submit(run_client, c) for c in range(clients)]
            results = [x for f in futures for x in f.result(timeout=600)]
        elapsed = time.monotonic() - t0
        completed = metric(base, "llada_rt_requests_total", endpoint="completions", outcome="completed")
        latency_n = metric(base, "llada_rt_request_latency_seconds_count")
        ttft_n = metric(base, "llada_rt_time_to_first_token_seconds_count")
        forwards = metric(base, "llada_rt_forwards_total")
        steps = metric(base, "llada_rt_engine_steps_total")
        step_n, step_s = metric(base, "llada_rt_engine_step_seconds_count"), metric(base, "llada_rt_engine_step_seconds_sum")
        rows_n, rows_sum = metric(base, "llada_rt_engine_step_rows_count"), metric(base, "llada_rt_engine_step_rows_sum")
        in_flight, depth = metric(base, "llada_rt_rows_in_flight"), metric(base, "llada_rt_queue_depth")
    wrong = []
    for job, got in zip(jobs, results):
        want = solo(ref, completion_ids(ref, job["prompt"]), job["max_tokens"], **job["opts"])
        if got != want[:2]:
            wrong.append((job, got, want))
    print(f"{len(jobs)} requests in {elapsed:.1f} s, {steps:.0f} engine steps, {forwards:.0f} forwards; "
          f"{len(wrong)} differ from solo: {wrong[:3]}")
    assert not wrong
    assert completed == latency_n == ttft_n == len(jobs)
    assert in_flight == 0 and depth == 0
    assert forwards >= steps > 0
    # every step timed, within the load's wall time; rows per step between 1 and max_rows, above 1 on average
    print(f"{step_s / step_n * 1e3:.1f} ms and {rows_sum / rows_n:.2f} rows per step")
    assert step_n == rows_n == steps and 0 < step_s < elapsed
    assert steps <= rows_sum <= 6 * steps and rows_sum > 1.5 * steps
    # continuous batching: far fewer steps than the requests' steps one at a time
    assert steps < sum(-(-j["max_tokens"] // 8) * 8 for j in jobs) / 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_cli_serve_on_the_shipped_model_drains_on_sigterm(tmp_path):
    """`llada-rt serve` in a subprocess with the shipped model: a stream in flight when SIGTERM comes is finished
    (text equal to Runtime.generate alone, [DONE]), no new connection is taken, and the process exits 0."""
    port = _free_port()
    cmd = [sys.executable, "-m", "llada_rt.cli", "serve", "--port", str(port), "--backend", BACKEND, "--threads", "1",
           "--max-rows", "2", "--log-level", "warning", "--block-length", "8"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tempfile.gettempdir())
    base = f"http://127.0.0.1:{port}"
    try:
        t0 = time.monotonic()
        while True:
            assert proc.poll() is None, proc.stdout.read()
            assert time.monotonic() - t0 < 120, "the server did not come up"
            try:
                if call(base, "GET", "/health", timeout=2)[0] == 200:
                    break
            except OSError:
                time.sleep(0.2)
        c = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=300)
        prompt = "Reverse the string: qwxk"
        kw = dict(model="small", messages=[{"role": "user", "content": prompt}], max_tokens=24)
        stream = c.chat.completions.create(stream=True, extra_body={"llada_canvas": True}, **kw)
        it = iter(stream)
        parts = [next(it).choices[0].delta.content or "" for _ in range(2)]
        proc.send_signal(signal.SIGTERM)
        t1 = time.monotonic()
        while time.monotonic() - t1 < 10:   # the listening socket closes
            try:
                call(base, "GET", "/health", timeout=1)
                time.sleep(0.1)
            except OSError:
                break
        else:
            pytest.fail("the server still takes connections 10 s after SIGTERM")
        rest = list(it)
        parts += [ch.choices[0].delta.content or "" for ch in rest]
        assert proc.wait(60) == 0
        out = proc.stdout.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    torch.set_num_threads(1)
    rt = Runtime(backend=BACKEND)
    want = rt.generate(prompt, gen_length=24, block_length=8, steps=24)
    print("streamed", repr("".join(parts)), "solo", repr(want.text), "finish", rest[-1].choices[0].finish_reason)
    print(out[-2000:])
    assert "".join(parts) == rt.tokenizer.decode(want.token_ids[0][:24])
    assert rest[-1].choices[0].finish_reason in ("stop", "length")


def test_cli_serve_rejects_defaults_that_cannot_run(capsys):
    from llada_rt.cli import main

    assert main(["serve", "--backend", BACKEND, "--threshold", "2"]) == 2
    err = capsys.readouterr().err
    print(err)
    assert "default generation options cannot run" in err and "threshold" in err
    assert main(["serve", "--backend", BACKEND, "--max-rows", "0"]) == 2


def test_no_op_values_of_unsupported_fields_are_accepted(ref, client):
    """What clients send by default (top_p 1, zero penalties, user, logprobs null...) changes nothing."""
    want = solo(ref, chat_ids(ref, [{"role": "user", "content": "Reverse the string: abcd"}]), 8)
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Reverse the string: abcd"}],
                                       max_completion_tokens=8, top_p=1, frequency_penalty=0, presence_penalty=0,
                                       user="someone", n=1, response_format={"type": "text"}, logprobs=False,
                                       tools=[], stream=False)
    print(repr(r.choices[0].message.content), want)
    assert (r.choices[0].message.content, r.choices[0].finish_reason) == want[:2]


def test_bench_serve_round_and_engine_share(ckpt):
    """bench_serve's closed-loop round against a live server, and the engine step timing it reads from /metrics:
    one client gives one row per step, the steps counted are the server's own."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
    import bench_serve
    with serving(ckpt, max_rows=4) as (base, app):
        before = bench_serve.engine_counters(base)
        res = bench_serve.run_round(base, MODEL, ["Reverse the string: abc", "Sort the digits: 3 1 2"], 1, 8, {})
        share = bench_serve.engine_share(before, bench_serve.engine_counters(base))
        steps = metric(base, "llada_rt_engine_steps_total")
    print(res["requests_per_s"], share)
    assert res["requests"] == 2 and res["output_tokens"] > 0
    assert share["engine_steps"] == steps - before["steps"] > 0
    assert share["engine_rows_per_step"] == 1.0 and share["engine_ms_per_step"] > 0
    assert bench_serve.engine_share(before, before) == {}
