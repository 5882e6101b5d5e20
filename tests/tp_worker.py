"""One rank of the tensor-parallel tests (tests/test_tensor_parallel.py starts one process per rank with torchrun's
environment): runs the jobs of a JSON spec through Runtime inside the world and saves what this rank saw."""
import json
import resource
import sys

import torch


def main(spec_path: str, out_path: str) -> None:
    torch.set_num_threads(1)
    from llada_rt import Runtime
    from llada_rt.model import forward

    spec = json.loads(open(spec_path).read())
    results = {}
    for job in spec["jobs"]:
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
