"""One rank of the tensor-parallel tests (tests/test_tensor_parallel.py starts one process per rank with torchrun's
environment): runs the jobs of a JSON spec through Runtime inside the world and saves what this rank saw."""
import json
import os
import resource
import sys
from pathlib import Path

import torch


def peak_rss_bytes() -> int:
    """VmHWM: this process image's peak resident set (ru_maxrss would carry the parent's peak across exec)."""
    line = next(l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024


def load_peak(ckpt: str) -> dict:
    """The resident-set peak that loading this rank's weights adds (path fixed: no per-shape measurement runs)."""
    from llada_rt.config import load_config
    from llada_rt.parallel import init_tensor_parallel
    from llada_rt.weights import load_weights

    tp = init_tensor_parallel(torch.device("cpu"))
    cfg = load_config(ckpt)
    before = peak_rss_bytes()
    w = load_weights(ckpt, cfg, tp=tp, path="torch_nk")
    out = {"peak_bytes": peak_rss_bytes() - before,
           "weight_bytes": sum(t.numel() * t.element_size() for t in w.tensors())}
    del w
    return out


def main(spec_path: str, out_path: str) -> None:
    torch.set_num_threads(1)
    from llada_rt import Runtime
    from llada_rt.model import forward

    spec = json.loads(open(spec_path).read())
    results = {}
    if "load_peak" in spec:   # first, while nothing larger has raised the peak
        results["load_peak"] = load_peak(spec["load_peak"])
    for job in spec.get("jobs", []):
        rt = Runtime(job["ckpt"], device="cpu", **job.get("runtime", {}))
        assert rt.tp is not None and rt.weights.tp is rt.tp, "Runtime inside a torchrun world must shard"
        r = {"rank": rt.tp.rank, "size": rt.tp.size,
             "weight_bytes": sum(t.numel() * t.element_size() for t in rt.weights.tensors())}
        if "ids" in job:
            with torch.inference_mode():
                r["logits"] = forward(rt.config, rt.weights, torch.tensor(job["ids"]))   # (B, S, V / size)
        r["tokens"] = {}
        for name, options in job.get("generate", {}).items():
            before = rt.tp.bytes_reduced, rt.tp.bytes_gathered
            options = dict(options)
            res = rt.generate(options.pop("prompt", job["prompt"]), **options)
            r["tokens"][name] = res.token_ids
            r.setdefault("collective_bytes", {})[name] = (rt.tp.bytes_reduced - before[0],
                                                          rt.tp.bytes_gathered - before[1], res.nfe)
        if "likelihood" in job:
            r["likelihood"] = rt.log_likelihood(**job["likelihood"]).estimates
        results[job["name"]] = r
    results["maxrss_kib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss   # torch itself included
    torch.save(results, out_path)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
