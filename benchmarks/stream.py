"""Peak memory of `preftune train` against data size: the in-memory path and --stream.

    python benchmarks/stream.py --size-mb 2048          # the issue's check: a 2 GB .jsonl
    python benchmarks/stream.py --size-mb 300 --only stream
    python benchmarks/stream.py --size-mb 600 --prompt-words 200 --memory-cap-mib 512   # data larger than memory

Writes a synthetic .jsonl of at least --size-mb MB (the toy counting task, rows of ~100 bytes), then runs a few
steps of `preftune train` on the toy model (`tests/toy.py`, `save_model_folder`) in a child process, once per
path, sampling its /proc status every 0.2 s: peak VmRSS (VmHWM) and peak RssAnon (memory the process owns;
the memory-mapped token ids are file pages, counted in RssFile, which the kernel can drop at any time).
--no-ref-cache: the cached reference would run the reference model over every pair first (hours on a CPU for
millions of pairs); the few steps measured need only their own pairs' reference log-probs.
--memory-cap-mib runs each child in a memory cgroup of that size (root, a cgroup v1 or v2 memory controller):
the kernel then reclaims file pages (the token ids, the data file's page cache) and kills the child if the memory
it owns passes the cap, so a file larger than the cap shows that --stream needs less memory than the data.
--prompt-words puts that many counting words before each prompt: longer rows, fewer per MB (tokenizing runs at
about 1 MB/s either way; short rows are slower per MB).
Writes benchmarks/out/stream/results.json; the data file is deleted unless --keep.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

# The toy model and data builders are test fixtures in tests/toy.py, not part of the package.
sys.path.append(str(Path(__file__).resolve().parent.parent / "tests"))
from toy import counting_pairs, save_model_folder  # noqa: E402

OUT = Path(__file__).resolve().parent / "out" / "stream"


def write_data(path: Path, size_mb: float, prompt_words: int = 0) -> int:
    """Rows of the toy task (a new seed per 10 000 rows) until the file holds `size_mb` MB; returns the rows."""
    rows, seed = 0, 0
    filler = "".join(f"{i % 20} " for i in range(prompt_words))
    with open(path, "w", encoding="utf-8") as f:
        while f.tell() < size_mb * 1e6:
            f.write(
                "".join(
                    json.dumps({**r, "prompt": filler + r["prompt"]}) + "\n" for r in counting_pairs(10_000, seed=seed)
                )
            )
            rows, seed = rows + 10_000, seed + 1
    return rows


class MemoryCap:
    """A memory cgroup of `mib` MiB for a child process: v1 (memory.limit_in_bytes) or v2 (memory.max)."""

    def __init__(self, mib: int):
        v1 = Path("/sys/fs/cgroup/memory")
        if (v1 / "memory.limit_in_bytes").exists():
            self.group, limit, self.peak_file = (
                v1 / f"preftune-stream-{os.getpid()}",
                "memory.limit_in_bytes",
                "memory.max_usage_in_bytes",
            )
        elif Path("/sys/fs/cgroup/cgroup.controllers").exists():
            self.group, limit, self.peak_file = (
                Path(f"/sys/fs/cgroup/preftune-stream-{os.getpid()}"),
                "memory.max",
                "memory.peak",
            )
        else:
            raise SystemExit("--memory-cap-mib: no cgroup memory controller under /sys/fs/cgroup")
        self.group.mkdir()
        (self.group / limit).write_text(str(mib * 2**20))

    def join(self) -> None:
        """In the child, before exec: move it into the group."""
        (self.group / "cgroup.procs").write_text(str(os.getpid()))

    def peak_mib(self) -> float:
        return int((self.group / self.peak_file).read_text()) / 2**20

    def remove(self) -> None:
        self.group.rmdir()


def status_kib(pid: int) -> dict[str, int]:
    with open(f"/proc/{pid}/status") as f:
        return {k: int(v.split()[0]) for k, v in (line.split(":", 1) for line in f) if v.strip().endswith("kB")}


def measure(args: list[str], cap: MemoryCap | None = None) -> dict:
    """Run `preftune train ARGS` (in `cap`'s cgroup); peak memory in MiB sampled every 0.2 s, wall time, exit code
    (-9: killed, by the cgroup's OOM killer under a cap)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    start = time.perf_counter()
    child = subprocess.Popen(
        [sys.executable, "-m", "preftune", "train", *args],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=cap.join if cap else None,
    )
    peak = {"VmHWM": 0, "RssAnon": 0, "RssFile": 0}
    while child.poll() is None:
        try:
            now = status_kib(child.pid)
        except (OSError, ValueError):  # exiting
            break
        peak = {key: max(value, now.get(key, 0)) for key, value in peak.items()}
        time.sleep(0.2)
    err = child.communicate()[1]
    result = {f"peak_{k}_mib": v / 1024 for k, v in peak.items()}
    if cap:
        result["cgroup_peak_mib"] = cap.peak_mib()  # the process's memory and the page cache charged to it
    return {
        **result,
        "seconds": time.perf_counter() - start,
        "exit": child.returncode,
        "last_lines": err.strip().splitlines()[-3:],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=float, default=2048, help="size of the synthetic .jsonl in MB")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--only", choices=("memory", "stream"), help="run one path only")
    parser.add_argument("--keep", action="store_true", help="keep the data file")
    parser.add_argument("--prompt-words", type=int, default=0, help="counting words put before each prompt")
    parser.add_argument("--memory-cap-mib", type=int, help="run each child in a memory cgroup of this size")
    args = parser.parse_args()

    OUT.mkdir(parents=True, exist_ok=True)
    model = OUT / "model"
    if not model.exists():
        save_model_folder(model)
    data = OUT / "train.jsonl"
    rows = write_data(data, args.size_mb, args.prompt_words)
    file_mb = data.stat().st_size / 1e6
    print(f"{data}: {file_mb:.0f} MB, {rows} rows")
    results = {
        "file_mb": file_mb,
        "rows": rows,
        "steps": args.steps,
        "memory_cap_mib": args.memory_cap_mib,
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
    }
    for path in ("stream", "memory"):
        if args.only and args.only != path:
            continue
        run = OUT / f"run-{path}"
        if run.exists():
            import shutil

            shutil.rmtree(run)
        flags = [
            "--model",
            str(model),
            "--data",
            str(data),
            "--output",
            str(run),
            "--batch-size",
            "8",
            "--max-steps",
            str(args.steps),
            "--no-ref-cache",
            "--no-report",
            "--device",
            "cpu",
            "--max-length",
            "256",
        ]  # the toy model's positions
        cap = MemoryCap(args.memory_cap_mib) if args.memory_cap_mib else None
        try:
            results[path] = measure(flags + (["--stream"] if path == "stream" else []), cap)
        finally:
            if cap:
                cap.remove()
        r = results[path]
        capped = f", cgroup peak {r['cgroup_peak_mib']:.0f} MiB of {args.memory_cap_mib}" if cap else ""
        print(
            f"{path:>6}: exit {r['exit']}, {r['seconds']:.0f} s, peak RSS {r['peak_VmHWM_mib']:.0f} MiB "
            f"(anonymous {r['peak_RssAnon_mib']:.0f} MiB, file-backed {r['peak_RssFile_mib']:.0f} MiB{capped}) "
            f"for a {file_mb:.0f} MB file"
        )
    (OUT / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    if not args.keep:
        data.unlink()


if __name__ == "__main__":
    main()
