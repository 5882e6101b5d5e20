"""The llada-rt command: generate, chat, bench, serve and info on a LLaDA checkpoint (the shipped small model by default)."""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import shutil
import signal
import sys
import threading
import time
from pathlib import Path

# Exit codes (listed in `llada-rt --help` and README): 0 done; 1 the checkpoint or the runtime failed; 2 a bad
# argument, option or prompt; 130 interrupted (Ctrl-C); 141 standard output closed by its reader (as SIGPIPE).
EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_INTERRUPTED, EXIT_BROKEN_PIPE = 0, 1, 2, 130, 141
EXIT_CODES = ("exit codes: 0 done; 1 the checkpoint or the runtime failed; 2 a bad argument, option or prompt; "
              "130 interrupted (Ctrl-C); 141 standard output closed by its reader")


class UsageError(Exception):
    """A bad argument: reported in one line with exit code 2."""


def _generation_fields():
    from .generation_config import GenerationConfig

    return dataclasses.fields(GenerationConfig)


_OPTION_HELP = {
    "gen_length": "answer positions (mask tokens) after the prompt",
    "block_length": "semi-autoregressive block size; divides gen_length",
    "steps": "total denoising steps over all blocks (runtime: gen_length)",
    "temperature": "Gumbel-max sampling temperature; 0 is greedy",
    "cfg_scale": "classifier-free guidance scale (unconditional = prompt masked)",
    "remasking": "which masked positions to commit each step",
    "logits_eos_inf": "never predict EOS",
    "confidence_eos_eot_inf": "EOS/EOT predictions get confidence 0 (committed last)",
    "seed": "seed for temperature > 0 and random remasking",
    "mode": "sampler: exact (the official algorithm) or a fast mode",
    "threshold": "parallel decoding: commit every masked position with confidence >= this",
    "factor": "parallel decoding: Fast-dLLM's factor rule",
}


def _choices(name: str):
    from .generation_config import MODES, REMASKING

    return {"mode": MODES, "remasking": REMASKING}.get(name)


def _add_generation_options(p: argparse.ArgumentParser) -> None:
    """One option per GenerationConfig field, so every option of the runtime (new modes included) is reachable."""
    g = p.add_argument_group("generation options (default: the checkpoint's generation_config.json, else the "
                             "runtime's)")
    for f in _generation_fields():
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else None
        kind = type(default) if default is not None else None
        text = _OPTION_HELP.get(f.name, f.name.replace("_", " "))
        if kind is bool:
            g.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None,
                           help=f"{text} (runtime default: {default})")
        else:
            ftype = {"int": int, "float": float, "str": str}.get(str(f.type).split(" |")[0].strip("'\" "), None) \
                or kind or str
            g.add_argument(flag, dest=f.name, type=ftype, default=None, metavar=f.name.upper(),
                           choices=_choices(f.name), help=f"{text} (runtime default: {default})")


def _options(args) -> dict:
    """The generation options given on the command line (Runtime puts them over generation_config.json's)."""
    return {f.name: getattr(args, f.name) for f in _generation_fields() if getattr(args, f.name, None) is not None}


def _load(args, **runtime_options):
    import torch

    from . import Runtime

    if args.model is not None and not Path(args.model).is_dir():
        raise UsageError(f"--model {args.model}: no such directory (a LLaDA checkpoint directory holds config.json, "
                         "model.safetensors and tokenizer.json)")
    if args.device and args.device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError("--device cuda: torch sees no CUDA GPU on this machine; use --device cpu")
    if args.threads:
        torch.set_num_threads(args.threads)
    return Runtime(args.model, device=args.device, dtype=args.dtype, **runtime_options)


def _decode(data: bytes, source: str) -> str:
    """UTF-8 text (a leading byte-order mark dropped); anything else is a usage error naming the source and byte."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise UsageError(f"{source}: not UTF-8 text (byte {e.start} is 0x{data[e.start]:02x}); save it as UTF-8") \
            from None


def _read_stdin() -> str:
    if sys.stdin is None:
        raise UsageError("no prompt: stdin is closed; pass the prompt as an argument or with --file PATH")
    data = sys.stdin.buffer.read() if hasattr(sys.stdin, "buffer") else sys.stdin.read().encode("utf-8",
                                                                                               "surrogateescape")
    return _decode(data, "stdin")


def _read_prompt(args) -> str:
    if args.prompt is not None and args.file is not None:
        raise UsageError("give the prompt either as an argument or with --file, not both")
    if args.file is not None:
        if args.file == "-":
            return _read_stdin()
        try:
            data = Path(args.file).read_bytes()
        except OSError as e:
            raise UsageError(f"--file {args.file}: {e.strerror or e}") from None
        return _decode(data, f"--file {args.file}")
    if args.prompt is not None and args.prompt != "-":
        return args.prompt
    if args.prompt is None and sys.stdin is not None and sys.stdin.isatty():
        raise UsageError("no prompt: pass it as an argument, with --file PATH, or on stdin")
    return _read_stdin()


class _Frame:
    """Redraws a multi-line frame in place on a terminal; on a pipe, prints one frame per step."""

    def __init__(self, stream):
        self.stream, self.tty, self.lines = stream, stream.isatty(), 0

    def show(self, text: str) -> None:
        if not self.tty:
            print(text, file=self.stream, flush=True)
            return
        width = max(shutil.get_terminal_size().columns, 20)
        if self.lines:
            self.stream.write(f"\x1b[{self.lines}F\x1b[J")
        self.stream.write(text + "\n")
        self.stream.flush()
        self.lines = sum(max(1, -(-len(line) // width)) for line in text.split("\n"))


def _bar(done: int, total: int, width: int = 24) -> str:
    k = width * done // max(total, 1)
    return "[" + "#" * k + "." * (width - k) + "]"


def _stream(rt, prompt: str, opts: dict, chat, stream) -> tuple[str, int]:
    """Generates while showing the canvas unmask step by step; returns (final text, nfe)."""
    from .runtime import MASK_GLYPH  # shown for a still-masked position

    glyph = MASK_GLYPH if (getattr(stream, "encoding", "") or "").lower().startswith("utf") else "_"
    frame = _Frame(stream)
    t0 = time.perf_counter()
    total = rt.make_config(opts).total_steps  # an upper bound for threshold/factor/early-stop decoding
    result = None
    for ev in rt.stream(prompt, chat=chat, **opts):
        text = ev.canvas_text[0].replace(MASK_GLYPH, glyph)
        frame.show(f"{_bar(ev.step, total)} step {ev.step}/{total}  nfe {ev.nfe}  "
                   f"{time.perf_counter() - t0:.1f}s\n{text}")
        result = ev.result or result
    return result.text, result.nfe


def cmd_generate(args) -> int:
    prompt = _read_prompt(args)
    if not prompt.strip():
        raise UsageError("the prompt is empty")
    rt = _load(args)
    opts = _options(args)
    chat = None if args.chat is None else args.chat
    if args.stream:
        text, nfe = _stream(rt, prompt, opts, chat, sys.stderr if args.json else sys.stdout)
        if args.json:
            print(json.dumps({"text": text, "nfe": nfe}))
        else:
            print(f"\n{text}" if sys.stdout.isatty() else f"--- answer\n{text}")
        return EXIT_OK
    res = rt.generate(prompt, chat=chat, **opts)
    if args.json:
        print(json.dumps({"text": res.text, "token_ids": res.token_ids[0], "nfe": res.nfe, "steps": res.steps,
                          "tokens_per_forward": res.tokens_per_forward, "timings": res.timings,
                          "options": dataclasses.asdict(res.config)}))
    else:
        print(res.text)
        if args.verbose:
            print(f"[nfe {res.nfe}, {res.tokens_per_forward:.2f} tokens/forward, "
                  f"{res.timings.get('total_s', 0.0):.2f}s, options {opts}]", file=sys.stderr)
    return EXIT_OK


def cmd_chat(args) -> int:
    """Multi-turn REPL (Runtime.chat): every turn sees the conversation so far, as ML-GSAI chat.py. A turn that cannot
    run (a message too long for the context, not valid text) is refused with a one-line error and the session goes
    on; when the history outgrows the context, the oldest turns are left out with a notice."""
    from .generation_config import GenerationConfigError
    from .prompts import PromptError

    if sys.stdin is None:
        raise UsageError("stdin is closed; chat reads the conversation from stdin")
    if hasattr(sys.stdin, "reconfigure"):   # a line that is not UTF-8 is then refused as its own turn, by position
        sys.stdin.reconfigure(errors="surrogateescape")
    rt = _load(args)
    opts = _options(args)
    if not rt.tokenizer.is_chat:
        raise UsageError(f"{rt.path}: the checkpoint has no chat_template (a Base model); use `generate` instead")
    # bad options: a usage error before the first turn, not a refusal of every turn
    rt.make_config(opts).validate(None, rt.config.max_sequence_length, rt.device.type)
    interactive = sys.stdin.isatty()
    if interactive:
        print("llada-rt chat: type a message; /reset starts over, /exit (or Ctrl-D) quits.", flush=True)
    messages: list[dict] = []
    while True:
        try:
            line = input("you> " if interactive else "")
        except EOFError:
            break
        msg = line.strip()
        if not msg:
            continue
        if msg in ("/exit", "/quit", "exit", "quit"):
            break
        if msg == "/reset":
            messages = []
            print("(conversation cleared)", flush=True)
            continue
        messages.append({"role": "user", "content": msg})
        try:
            res = rt.chat(messages, **opts)
        except (GenerationConfigError, PromptError) as e:
            messages.pop()
            print(f"llada-rt chat: turn refused: {e} (the conversation so far is kept)", file=sys.stderr, flush=True)
            continue
        if res.dropped_turns:
            print(f"(the conversation outgrew the context: the oldest {res.dropped_turns} turn(s) were left out)",
                  file=sys.stderr, flush=True)
            messages = messages[2 * res.dropped_turns:]
        messages.append({"role": "assistant", "content": res.text})
        print(("bot> " if interactive else "") + res.text, flush=True)
    return EXIT_OK


def cmd_bench(args) -> int:
    """bench/bench_generate.py's measurement (llada_rt.benchmark) on the installed package."""
    from .benchmark import main as bench_main

    argv = list(args.bench_args)
    if argv and argv[0] == "--":
        argv = argv[1:]
    for flag, value in (("--model", args.model), ("--device", args.device), ("--dtype", args.dtype),
                        ("--threads", args.threads)):
        if value is not None:
            argv = [flag, str(value)] + argv
    try:
        return int(bench_main(argv, prog="llada-rt bench") or 0)
    except SystemExit as e:   # argparse inside the benchmark: usage errors exit with 2
        return int(e.code or 0)


def cmd_eval(args) -> int:
    """lm-eval-harness's `run` with the llada_rt model registered and llada_rt's local tasks on the include path."""
    try:
        from .lm_eval_model import run_cli
    except ImportError as e:
        raise UsageError(f"lm-eval is not installed ({e}); install it with: pip install 'llada_rt[eval]'") from None
    argv = list(args.lm_eval_args)
    if argv and argv[0] == "--":
        argv = argv[1:]
    if not argv:
        raise UsageError("no lm-eval options; e.g. llada-rt eval --tasks llada_rt --apply_chat_template")
    return run_cli(argv, model=args.model, device=args.device, dtype=args.dtype, threads=args.threads)
def cmd_serve(args) -> int:
    """The OpenAI-compatible server (llada_rt.serve) on the engine; runs until SIGTERM (drains) or Ctrl-C."""
    try:
        from .serve import ServeSettings, run
    except ImportError as e:
        raise UsageError(f"llada-rt serve needs the serve extra ({e.name} is not installed): "
                         "pip install 'llada_rt[serve]'") from None
    if args.max_rows < 1 or args.max_queue < 0:
        raise UsageError(f"--max-rows must be >= 1 and --max-queue >= 0, got {args.max_rows} and {args.max_queue}")
    if not 0 < args.port < 65536:
        raise UsageError(f"--port must be in 1..65535, got {args.port}")
    from .serve.protocol import APIError, parse_request

    rt = _load(args, backend=args.backend, max_rows=args.max_rows)
    defaults = _options(args)
    max_tokens = defaults.pop("gen_length", None) or rt.make_config({}).gen_length
    settings = ServeSettings(model_name=args.served_model_name or rt.path.name, max_rows=args.max_rows,
                             max_queue=args.max_queue, defaults=defaults, max_tokens=max_tokens)
    try:   # bad server defaults fail now, not in every request: a request that sets nothing
        parse_request("completion", {"model": settings.model_name, "prompt": [rt.tokenizer.eos_id]}, rt, settings)
    except APIError as e:
        raise UsageError(f"the server's default generation options cannot run: {e.message}") from None
    print(f"llada-rt serve: model {settings.model_name!r} ({rt}, backend {args.backend}) at "
          f"http://{args.host}:{args.port}/v1, {args.max_rows} rows, queue {args.max_queue}", file=sys.stderr,
          flush=True)
    run(rt, settings, host=args.host, port=args.port, log_level=args.log_level)
    return EXIT_OK


def _human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} GiB"


def cmd_info(args) -> int:
    """Checkpoint summary from config.json, the safetensors headers and the tokenizer files (no weights loaded)."""
    from .config import GENERATION_CONFIG_FILE, load_config, load_generation_config
    from .generation_config import check_defaults
    from .runtime import SHIPPED_MODEL
    from .tokenizer import Tokenizer
    from .weights import checkpoint_files, read_header, validate

    path = Path(args.model) if args.model is not None else SHIPPED_MODEL
    if not path.is_dir():
        raise UsageError(f"--model {path}: no such directory")
    cfg = load_config(path)
    tok = Tokenizer(path, mask_id=cfg.mask_token_id, eos_id=cfg.eos_token_id)
    validate(cfg, path)
    gen_cfg = load_generation_config(path, vocab_size=cfg.vocab_size)
    check_defaults(gen_cfg, str(path / GENERATION_CONFIG_FILE))   # what generate would refuse, info reports too
    files = checkpoint_files(path)
    n_params, dtypes = 0, set()
    for f in set(files.values()):
        for name, meta in read_header(f).items():
            if name == "__metadata__":
                continue
            numel = 1
            for s in meta["shape"]:
                numel *= s
            n_params += numel
            dtypes.add(meta["dtype"])
    disk = sum(p.stat().st_size for p in path.iterdir() if p.is_file())
    info = {
        "path": str(path),
        "architecture": f"LLaDA (bidirectional Llama-style transformer, masked diffusion), {cfg.n_layers} layers, "
                        f"d_model {cfg.d_model}, {cfg.n_heads} heads x {cfg.head_dim} (kv heads {cfg.n_kv_heads}), "
                        f"SwiGLU MLP {cfg.mlp_hidden_size}, RMSNorm eps {cfg.rms_norm_eps}, RoPE theta "
                        f"{cfg.rope_theta:g}, vocab {cfg.vocab_size} (embedding rows {cfg.embedding_size}), "
                        f"max_sequence_length {cfg.max_sequence_length}, "
                        f"{'tied' if cfg.weight_tying else 'untied'} LM head",
        "parameters": n_params,
        "dtype": ", ".join(sorted(dtypes)),
        "size_on_disk": _human_bytes(disk),
        "chat_template": tok.is_chat,
        "special_ids": {"bos": tok.bos_id, "eos": tok.eos_id, "pad": cfg.pad_token_id, "mask": cfg.mask_token_id,
                        "eot": tok.eot_id, "start_header": tok.start_header_id, "end_header": tok.end_header_id},
    }
    if gen_cfg:
        info["generation_config"] = gen_cfg
    if args.json:
        print(json.dumps(info, indent=2))
        return EXIT_OK
    print(f"model:        {info['path']}")
    print(f"architecture: {info['architecture']}")
    print(f"parameters:   {n_params:,} ({n_params / 1e6:.2f} M)")
    print(f"dtype:        {info['dtype']}")
    print(f"size on disk: {info['size_on_disk']}")
    print(f"chat:         {'yes (chat_template in tokenizer_config.json)' if tok.is_chat else 'no (Base model)'}")
    print("special ids:  " + ", ".join(f"{k} {v}" for k, v in info["special_ids"].items()))
    if "generation_config" in info:
        print(f"generation:   {info['generation_config']}")
    return EXIT_OK


def cmd_quantize(args) -> int:
    """Writes the int8 checkpoint of SRC into the new directory DST (layout: llada_rt/weights.py, README)."""
    from .weights import quantize_checkpoint

    src = Path(args.src)
    if not src.is_dir():
        raise UsageError(f"{src}: no such directory (a LLaDA checkpoint directory holds config.json, model.safetensors "
                         "and tokenizer.json)")
    t0 = time.perf_counter()
    stats = quantize_checkpoint(src, Path(args.dst))
    print(f"{args.dst}: {len(stats['quantized'])} weights int8 with per-output-channel scales, "
          f"{_human_bytes(stats['bytes_in'])} -> {_human_bytes(stats['bytes_out'])} in "
          f"{time.perf_counter() - t0:.1f}s; load it with llada_rt.Runtime({str(args.dst)!r}) or --model")
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--model", "-m", default=None, metavar="DIR",
                        help="LLaDA checkpoint directory (default: the small model shipped with llada_rt)")
    common.add_argument("--device", default=None, type=_device,
                        help="cpu, cuda or cuda:N (default: cuda when available)")
    common.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16", "fp32", "bf16", "fp16"],
                        help="weights dtype (default: bfloat16 on cuda, float32 on cpu)")
    common.add_argument("--threads", type=_threads, default=None, metavar="N", help="CPU threads for torch")
    common.add_argument("--debug", action="store_true", help="show tracebacks")

    p = argparse.ArgumentParser(
        prog="llada-rt", description="Run LLaDA masked-diffusion language models with llada_rt.",
        epilog="examples:\n  llada-rt generate \"Reverse the string: hello\"\n"
               "  echo \"What is 12 + 30?\" | llada-rt generate --stream\n  llada-rt chat\n  llada-rt info\n\n"
               + EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    g = sub.add_parser("generate", parents=[common], help="generate an answer for one prompt",
                       description="Generate an answer for a prompt given as an argument, with --file, or on stdin.")
    g.add_argument("prompt", nargs="?", default=None, help="the prompt ('-' or absent: read stdin)")
    g.add_argument("--file", "-f", default=None, help="read the prompt from this file ('-': stdin)")
    g.add_argument("--stream", action="store_true", help="show the canvas unmasking live, step by step")
    g.add_argument("--chat", dest="chat", action=argparse.BooleanOptionalAction, default=None,
                   help="apply the chat template (default: when the checkpoint has one)")
    g.add_argument("--json", action="store_true", help="print a JSON object (text, ids, nfe, timings)")
    g.add_argument("--verbose", "-v", action="store_true", help="print nfe and timing to stderr")
    _add_generation_options(g)
    g.set_defaults(func=cmd_generate)

    c = sub.add_parser("chat", parents=[common], help="multi-turn chat REPL (reads stdin)",
                       description="Multi-turn chat: each turn sees the whole conversation so far (as ML-GSAI "
                                   "chat.py). /reset clears it, /exit or Ctrl-D quits.")
    _add_generation_options(c)
    c.set_defaults(func=cmd_chat)

    b = sub.add_parser("bench", parents=[common], help="end-to-end generation benchmark (every decoding mode)",
                       description="bench/bench_generate.py's measurement: exact mode and each fast mode on the same "
                                   "prompts; the arguments after the options are passed on (`llada-rt bench -- "
                                   "--help` lists them).")
    b.add_argument("bench_args", nargs=argparse.REMAINDER, help="arguments of the benchmark")
    b.set_defaults(func=cmd_bench)

    e = sub.add_parser("eval", parents=[common], help="lm-eval-harness with llada_rt (and its local tasks)",
                       description="lm-eval's `run` with --model llada_rt, llada_rt's local tasks (llada_rt, "
                                   "llada_rt_heldout, llada_rt_capitals) on the include path and --batch_size auto; "
                                   "llada-rt's options (--model, --device, --dtype, --threads) come first, then "
                                   "lm-eval's (`lm-eval run --help`), e.g. --tasks llada_rt --apply_chat_template "
                                   "--model_args mode=dual,threshold=0.9 --limit 20.")
    e.add_argument("lm_eval_args", nargs=argparse.REMAINDER, help="lm-eval run options")
    e.set_defaults(func=cmd_eval)
    s = sub.add_parser("serve", parents=[common], help="OpenAI-compatible HTTP server (needs the serve extra)",
                       description="POST /v1/completions and /v1/chat/completions (JSON or server-sent events), "
                                   "GET /v1/models, /health, /metrics, with continuous batching on the engine. The "
                                   "generation options are the server's defaults for requests that do not set them; "
                                   "--gen-length is the default max_tokens. SIGTERM stops taking requests and "
                                   "finishes those in flight.")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    s.add_argument("--port", type=int, default=8000, help="TCP port (default: 8000)")
    s.add_argument("--max-rows", type=int, default=16, metavar="N", help="requests denoised at once (default: 16)")
    s.add_argument("--max-queue", type=int, default=64, metavar="M",
                   help="requests waiting for a row; beyond, 429 with Retry-After (default: 64)")
    s.add_argument("--backend", default="ops", choices=["ops", "torch"],
                   help="ops: the compiled kernels (default); torch: reference.py (slow; for comparisons)")
    s.add_argument("--served-model-name", default=None, metavar="NAME",
                   help="the model id of /v1/models and requests (default: the checkpoint directory's name)")
    s.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"],
                   help="uvicorn's log level (default: info)")
    _add_generation_options(s)
    s.set_defaults(func=cmd_serve)
    q = sub.add_parser("quantize", help="write an int8 copy of a checkpoint",
                       description="Quantize every linear weight of SRC (the LM head included) to int8 with symmetric "
                                   "per-output-channel scales and write the checkpoint to the new directory DST; "
                                   "the embedding and norms keep their dtype. DST loads directly.")
    q.add_argument("src", metavar="SRC", help="a float LLaDA checkpoint directory")
    q.add_argument("dst", metavar="DST", help="the directory to write (must not exist or be empty)")
    q.add_argument("--debug", action="store_true", help="show tracebacks")
    q.set_defaults(func=cmd_quantize)

    i = sub.add_parser("info", parents=[common], help="checkpoint summary",
                       description="Architecture, parameter count, dtype, size on disk and special token ids.")
    i.add_argument("--json", action="store_true", help="print a JSON object")
    i.set_defaults(func=cmd_info)
    return p


def _device(text: str) -> str:
    """--device: cpu, cuda or cuda:N (argparse reports anything else as a usage error)."""
    if not re.fullmatch(r"cpu|cuda(:\d{1,4})?", text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a device; use cpu, cuda or cuda:N")
    return text


_MAX_THREADS = 4096


def _threads(text: str) -> int:
    """--threads: a positive integer (torch's set_num_threads takes a C int)."""
    try:
        n = int(text)
    except ValueError:
        n = 0
    if not 1 <= n <= _MAX_THREADS:
        raise argparse.ArgumentTypeError(f"{text!r} is not a thread count; use an integer in [1, {_MAX_THREADS}]")
    return n


def _say(text: str) -> None:
    """One line on stderr, if there is a stderr to write to."""
    if sys.stderr is not None:
        try:
            print(text, file=sys.stderr, flush=True)
        except OSError:
            pass


def _exit_on_interrupt(signum, frame):
    """Ctrl-C at any moment exits 130 at once: a KeyboardInterrupt raised wherever Python happens to be (inside
    torch's import, or a Python callback of C++ code) can show a traceback or abort the process."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except BaseException:   # closed, a broken pipe, or interrupted inside a write of its own: nothing to keep
            pass
    try:
        os.write(2, b"\n")
    except OSError:
        pass
    os._exit(EXIT_INTERRUPTED)


def _silence_stdout() -> None:
    """After a broken pipe: point stdout at /dev/null, so that the interpreter's last flush does not fail again."""
    try:
        fd = os.open(os.devnull, os.O_WRONLY)
        os.dup2(fd, sys.stdout.fileno())
        os.close(fd)
    except (OSError, AttributeError, ValueError):   # stdout without a file descriptor (captured in-process)
        pass


def _error_kind(e: BaseException) -> str:
    """'usage' (exit 2: the caller's arguments, options or prompt), 'checkpoint' (exit 1: a file of the checkpoint;
    the message names it), or 'internal' (exit 1, with a pointer to --debug). Error classes are looked up only in
    modules already imported: an exception cannot be of a class whose module never loaded."""
    def classes(*names):
        out = []
        for name in names:
            module, cls = name.rsplit(".", 1)
            m = sys.modules.get(f"llada_rt.{module}")
            if m is not None:
                out.append(getattr(m, cls))
        return tuple(out)

    if isinstance(e, (UsageError, FileNotFoundError) + classes("generation_config.GenerationConfigError",
                                                                "prompts.PromptError")):
        return "usage"
    if isinstance(e, classes("config.ConfigError", "weights.CheckpointError", "tokenizer.TokenizerError")):
        return "checkpoint"
    return "internal"


def main(argv=None) -> int:
    """The llada-rt command; returns its exit code (EXIT_CODES). Never shows a traceback unless --debug."""
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGINT, _exit_on_interrupt) if in_main_thread else None
    try:
        return _main(argv)
    finally:
        if in_main_thread:
            signal.signal(signal.SIGINT, previous)


def _main(argv) -> int:
    if sys.stdout is None:
        _say("llada-rt: error: standard output is closed; nothing to write the result to")
        return EXIT_ERROR
    command, debug = "", os.environ.get("LLADA_RT_DEBUG") == "1"
    try:
        parser = build_parser()
        args, extra = parser.parse_known_args(argv)
        if extra:
            if args.command not in ("bench", "eval"):
                parser.error(f"unrecognized arguments: {' '.join(extra)}")
            passed_on = "bench_args" if args.command == "bench" else "lm_eval_args"  # the benchmark's / lm-eval's
            setattr(args, passed_on, extra + list(getattr(args, passed_on)))
        command, debug = f" {args.command}", debug or args.debug
        code = args.func(args)
        sys.stdout.flush()   # here, so that a closed pipe is reported as one, not at interpreter exit
        return code
    except KeyboardInterrupt:   # a SIGINT handler other than ours (main() called from a thread)
        _say("")
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        _silence_stdout()
        return EXIT_BROKEN_PIPE
    except Exception as e:  # every other failure: one clear line, the traceback only with --debug
        if debug:
            raise
        kind = _error_kind(e)
        text = " ".join(str(e).split()) or type(e).__name__
        suffix = f" ({type(e).__name__}; rerun with --debug for the traceback)" if kind == "internal" else ""
        _say(f"llada-rt{command}: error: {text}{suffix}")
        return EXIT_USAGE if kind == "usage" else EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
