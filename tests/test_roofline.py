"""bench/bench_roofline.py's compute probe: a GFLOP/s figure for torch.mm and for every linear path this CPU runs, in
fp32 and bf16, and the section runs from the command line."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))


def test_compute_probe_covers_every_path():
    import torch

    import bench_roofline
    rates = bench_roofline.compute_probe(iters=1, n=128, m=16, k=64)
    print(rates)
    expected = {f"{name} torch.mm" for name in ("float32", "bfloat16")}
    expected |= {f"{name} linear {p}" for name, dt in (("float32", torch.float32), ("bfloat16", torch.bfloat16))
                 for p in bench_roofline.paths_for(dt)}
    assert set(rates) == expected
    assert all(r > 0 and r == r for r in rates.values())


def test_compute_section_command(tmp_path):
    out = tmp_path / "roof.json"
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_roofline.py"), "--sections", "compute", "--iters",
                        "1", "--json", str(out)], capture_output=True, text=True, timeout=300)
    print(r.stdout[-800:], r.stderr[-800:])
    assert r.returncode == 0, r.stderr
    assert "compute probe" in r.stdout and json.loads(out.read_text())["compute"]
