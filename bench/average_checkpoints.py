"""Averages the weights of checkpoints saved along one training run (a uniform checkpoint average).

    python bench/average_checkpoints.py --out DIR CKPT [CKPT ...]

Every tensor of the result is the mean of the same tensor in each checkpoint, accumulated in float64 and stored in the
checkpoints' dtype. The checkpoints must come from one run: the same config.json, generation_config.json and
tokenizer files, the same tensor names and shapes, and training records (training.json) whose stages are a prefix of
one another's (a resumed run only adds stages). The result gets the files of the latest checkpoint and its training
record, plus an "average" entry naming the steps averaged and this command. Averaging trains nothing: the training
time of the result is that of its latest checkpoint.
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_small import RUN_ONLY_FIELDS, STAGE_FIELDS  # noqa: E402

SAME_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json")
WEIGHTS = "model.safetensors"


def _record(ckpt: Path) -> dict:
    path = ckpt / "training.json"
    if not path.is_file():
        raise ValueError(f"{ckpt}: no training.json; only checkpoints written by bench/train_small.py can be averaged")
    return json.loads(path.read_text())


def _fixed(record: dict) -> dict:
    """The options a run keeps from its first stage to its last."""
    return {k: v for k, v in record["train_config"].items() if k not in RUN_ONLY_FIELDS + STAGE_FIELDS}


def _stages_prefix(own: list[dict], chain: list[dict]) -> bool:
    """Whether the stages own begin chain: the earlier ones recorded alike, the last one the same stage saved part way
    or at its end (a checkpoint written at an evaluation holds a partial last stage)."""
    if not own or len(own) > len(chain) or own[:-1] != chain[:len(own) - 1]:
        return False
    last, theirs = own[-1], chain[len(own) - 1]
    return (last["command"], last["first_step"]) == (theirs["command"], theirs["first_step"]) and \
        last["steps"] <= theirs["steps"]


def _same_run(ckpts: list[Path], records: list[dict]) -> int:
    """Index of the latest checkpoint; raises unless the checkpoints are one run's."""
    for name in SAME_FILES:
        texts = [(c / name).read_text() if (c / name).is_file() else None for c in ckpts]
        if any(t != texts[0] for t in texts):
            raise ValueError(f"{name} differs between the checkpoints; only checkpoints of one run can be averaged")
    latest = max(range(len(ckpts)), key=lambda i: records[i]["step"])
    chain = records[latest]["stages"]
    for c, r in zip(ckpts, records):
        if not (_stages_prefix(r["stages"], chain) and _fixed(r) == _fixed(records[latest])):
            raise ValueError(f"{c}: its training record (options and stages) is not a prefix of that of "
                             f"{ckpts[latest]} (step {records[latest]['step']}); only checkpoints of one run can be "
                             "averaged")
    steps = [r["step"] for r in records]
    if len(set(steps)) != len(steps):
        raise ValueError(f"two checkpoints are at the same step ({steps}); give each step once")
    return latest


def average(ckpts: list[str | Path], out: str | Path, command: str | None = None) -> dict:
    """Writes the average of ckpts to out; returns its training record."""
    ckpts, out = [Path(c) for c in ckpts], Path(out)
    if len(ckpts) < 2:
        raise ValueError("give at least two checkpoints to average")
    if any(out.resolve() == c.resolve() for c in ckpts):
        raise ValueError(f"--out {out} is one of the checkpoints; write the average elsewhere")
    records = [_record(c) for c in ckpts]
    latest = _same_run(ckpts, records)
    tensors = [load_file(str(c / WEIGHTS)) for c in ckpts]
    names = set(tensors[0])
    for c, t in zip(ckpts, tensors):
        if set(t) != names or any(t[k].shape != tensors[0][k].shape or t[k].dtype != tensors[0][k].dtype
                                  for k in names):
            raise ValueError(f"{c}: its tensors (names, shapes or dtypes) differ from {ckpts[0]}'s")
    mean = {k: (sum(t[k].double() for t in tensors) / len(tensors)).to(tensors[0][k].dtype) for k in sorted(names)}
    out.mkdir(parents=True, exist_ok=True)
    for name in SAME_FILES:
        if (ckpts[latest] / name).is_file():
            (out / name).write_text((ckpts[latest] / name).read_text())
    save_file(mean, str(out / WEIGHTS), metadata={"format": "pt"})
    info = dict(records[latest])
    info["average"] = {"steps": sorted(r["step"] for r in records),
                       "command": command or "python bench/average_checkpoints.py --out "
                       + " ".join(shlex.quote(str(p)) for p in (out, *ckpts))}
    (out / "training.json").write_text(json.dumps(info, indent=2) + "\n")
    return info


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="directory for the averaged checkpoint")
    ap.add_argument("checkpoints", nargs="+", help="checkpoint directories written by bench/train_small.py")
    args = ap.parse_args(argv)
    shown = "python bench/average_checkpoints.py " + " ".join(shlex.quote(a) for a in
                                                              (argv if argv is not None else sys.argv[1:]))
    try:
        info = average(args.checkpoints, args.out, command=shown)
    except (ValueError, OSError) as e:
        print(f"average_checkpoints: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}: the mean of steps {info['average']['steps']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
