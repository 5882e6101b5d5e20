"""What the load-time NaN/inf check costs: load_weights with check_finite=True against False (timed round-robin), and
the per-tensor finite test on its own against torch.isfinite(t).all(), in GB/s of weights read.

    python bench/bench_load.py [--device cpu|cuda] [--dtype float32|bfloat16|float16] [--body d_model=512,n_layers=4]
        [--iters 5] [--threads N]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_kernels import timed_many  # noqa: E402

from llada_rt.benchmark import random_checkpoint  # noqa: E402
from llada_rt.config import load_config  # noqa: E402
from llada_rt.weights import _all_finite, load_weights  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--body", default="", help="random checkpoint body (LLaDA-8B vocabulary), e.g. d_model=512")
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = random_checkpoint(args.body, Path(tmp))
        cfg = load_config(ckpt)
        w = load_weights(ckpt, cfg, device, dtype, check_finite=False)
        tensors = w.tensors()
        nbytes = sum(t.numel() * t.element_size() for t in {id(t): t for t in tensors}.values())
        print(f"device {device}, {torch.get_num_threads()} threads, {args.dtype}, {w.num_parameters() / 1e6:.1f} M "
              f"parameters ({nbytes / 2**20:.0f} MiB), torch {torch.__version__}")
        del w
        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        load_on, load_off = timed_many([lambda: load_weights(ckpt, cfg, device, dtype, check_finite=True),
                                        lambda: load_weights(ckpt, cfg, device, dtype, check_finite=False)],
                                       device=device, warmup=1, iters=args.iters)
        print(f"load_weights  check_finite=True {load_on / 1e3:9.1f} ms | check_finite=False {load_off / 1e3:9.1f} ms "
              f"| ratio {load_on / load_off:.3f}")
        w = load_weights(ckpt, cfg, device, dtype, check_finite=False)
        tensors = w.tensors()

        def ours():
            for t in tensors:
                _all_finite(t)
            sync()

        def isfinite_all():
            for t in tensors:
                bool(torch.isfinite(t).all())
            sync()

        t_ours, t_ref = timed_many([ours, isfinite_all], device=device, warmup=1, iters=args.iters)
        print(f"finite test   aminmax {t_ours / 1e3:9.1f} ms ({nbytes / t_ours / 1e3:6.1f} GB/s) | "
              f"isfinite().all() {t_ref / 1e3:9.1f} ms ({nbytes / t_ref / 1e3:6.1f} GB/s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
