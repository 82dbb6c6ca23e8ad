"""How preftune's cost scales: time per pair against prompt and response length, peak memory against vocabulary
size and batch size. preftune only; the `padded-prompt` series runs preftune's plain layout (`--layout padded`: the prompt twice,
full logits, as TRL lays a batch out) for contrast.

    python benchmarks/scaling.py [--steps 3] [--json benchmarks/out/scaling.json]

Each point is a fresh fixture (`fixture.py --synthetic P,C,R`, random Llama hidden 256 × 4 layers) and a fresh
`preftune train` process under /usr/bin/time; time per pair is the median `step_time_s` of the training steps
after the first (the reference pass and start-up excluded) divided by the batch size; memory is the process's
peak resident set size.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
WORK = HERE / "out" / "scaling"


def fixture(name: str, vocab: str, lengths: str, pairs: int) -> Path:
    out = WORK / name
    if not (out / "pairs.jsonl").exists():
        subprocess.run(
            [
                sys.executable,
                str(HERE / "fixture.py"),
                "--out",
                str(out),
                "--vocab",
                vocab,
                "--synthetic",
                lengths,
                "--num-pairs",
                str(pairs),
            ],
            check=True,
            capture_output=True,
        )
    return out


def run(fix: Path, batch: int, steps: int, extra: list[str]) -> dict:
    run_dir = WORK / "run"
    shutil.rmtree(run_dir, ignore_errors=True)
    cmd = [
        "/usr/bin/time",
        "-v",
        sys.executable,
        "-m",
        "preftune",
        "train",
        "--model",
        str(fix / "model"),
        "--data",
        str(fix / "pairs.jsonl"),
        "--output",
        str(run_dir),
        "--batch-size",
        str(batch),
        "--max-steps",
        str(steps),
        "--max-length",
        "4096",
        "--ref-cache",
        str(WORK / "cache"),
        *extra,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(proc.stderr[-2000:])
    rss_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr).group(1))
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    step = statistics.median(r["step_time_s"] for r in records[1:])
    return {"s_per_pair": step / batch, "step_s": step, "peak_rss_mib": rss_kb / 1024}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--json", type=Path, default=HERE / "out" / "scaling.json")
    ap.add_argument(
        "--axes",
        default="prompt,response,vocabulary,batch,padded-prompt",
        help="which series to run (padded-prompt: the prompt series with --layout padded)",
    )
    args = ap.parse_args()
    WORK.mkdir(parents=True, exist_ok=True)
    points = []
    grid = [("prompt", "gpt2", f"{p},90,90", 4) for p in (128, 256, 512, 1024, 2048)]
    grid += [("response", "gpt2", f"512,{r},{r}", 4) for r in (32, 90, 256, 512)]
    grid += [("vocabulary", v, "512,90,90", 4) for v in ("llama2", "gpt2", "llama3.2")]
    grid += [("batch", "gpt2", "512,90,90", b) for b in (1, 2, 4, 8, 16)]
    grid += [("padded-prompt", "gpt2", f"{p},90,90", 4) for p in (128, 256, 512, 1024, 2048)]
    grid = [point for point in grid if point[0] in args.axes.split(",")]
    for axis, vocab, lengths, batch in grid:
        fix = fixture(f"{vocab}-{lengths.replace(',', '-')}", vocab, lengths, max(16, batch * args.steps))
        extra = ["--layout", "padded"] if axis.startswith("padded") else []
        point = {"axis": axis, "vocab": vocab, "lengths": lengths, "batch": batch, **run(fix, batch, args.steps, extra)}
        print(json.dumps(point), flush=True)
        points.append(point)
    args.json.write_text(json.dumps(points, indent=1))


if __name__ == "__main__":
    main()
