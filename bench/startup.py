"""The fixed cost of a training run: `vidgen train` to its first step, and its last step to exit.

    python bench/startup.py                 # 2 runs of 3 steps each, about 2 minutes on 2 cores
    python bench/startup.py --repeat 1 --family gan

Runs the real command in a fresh process (`vidgen train --workers 2 --zero-stage 2 --max-steps 3`
on a local Ray on 127.0.0.1, a generated dataset in a local folder), timestamps its output lines as
they arrive, and reports per run:
    to first step    process start -> the worker's "set-up in this worker" line (printed right after
                     step 1), split into: Python + imports + checks, Ray start (the driver's "Ray
                     ready in" line), Ray Train's worker group + Ray Data start (the rest), and the
                     worker's own phases (model, DeepSpeed, first batch, first step)
    last step to exit   the last progress line -> the process exits, split into the worker's phases
                     (samples and validation, checkpoint) and the rest (Ray Train shutdown, loss
                     plot, Ray shutdown)
Target: <= 15 s each. The baseline is the steps themselves: the median step time of the same run.
Results: bench/results/startup.json.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def timed_lines(cmd: list[str], env: dict) -> tuple[float, list[tuple[float, str]], int]:
    """Run `cmd`; (its start time, [(arrival time, line)], exit code) with times from perf_counter."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT)
    lines = [(time.perf_counter(), line.rstrip("\n")) for line in proc.stdout]
    proc.wait()
    return start, lines + [(time.perf_counter(), "<exit>")], proc.returncode


def phases(line: str) -> dict[str, float]:
    """'... : model 0.1 s, DeepSpeed 1.2 s' -> {"model": 0.1, "DeepSpeed": 1.2}."""
    body = line.split(": ", 1)[1] if ": " in line else ""
    return {m.group(1): float(m.group(2)) for m in re.finditer(r"([A-Za-z][A-Za-z ]*?) ([0-9.]+) s", body)}


def one_run(work: str, family: str, index: int) -> dict:
    data = os.path.join(work, "data")
    run = os.path.join(work, f"run-{index}")
    env = {**os.environ, "RAY_ADDRESS": ""}
    cmd = [sys.executable, "-m", "vidgen.cli", "train", "--family", family, "--preset", "tiny", "--data", data,
           "--run", run, "--workers", "2", "--zero-stage", "2", "--max-steps", "3", "--log-every", "1",
           "--micro-batch", "4"]
    start, lines, code = timed_lines(cmd, env)
    if code:
        raise SystemExit("\n".join(text for _, text in lines[-40:]))

    def first(pattern: str) -> tuple[float, str]:
        found = [(t, text) for t, text in lines if re.search(pattern, text)]
        if not found:
            raise SystemExit(f"`vidgen train` printed no line matching {pattern!r}; its output ends:\n"
                             + "\n".join(text for _, text in lines[-20:]))
        return found[0]

    ray_t, ray_line = first(r"Ray ready in")
    ray_s = float(re.search(r"Ray ready in ([0-9.]+) s", ray_line).group(1))
    setup_t, setup_line = first(r"set-up in this worker")
    worker = phases(setup_line)
    last_t = [t for t, text in lines if re.search(r"\] step \d+/3 ", text)][-1]
    end_line = first(r"after the last step")[1]
    exit_t = lines[-1][0]
    with open(os.path.join(run, "metrics.jsonl")) as f:
        step_times = [row["step_time_s"] for row in map(json.loads, f) if "step_time_s" in row]
    return {
        "to_first_step_s": setup_t - start,
        "first_step_parts": {"python, imports, checks": ray_t - start - ray_s, "Ray start": ray_s,
                             "Ray Train worker group, Ray Data": setup_t - ray_t - sum(worker.values()),
                             **{f"worker: {k}": v for k, v in worker.items()}},
        "last_step_to_exit_s": exit_t - last_t,
        "exit_parts": {**{f"worker: {k}": v for k, v in phases(end_line).items()}},
        "step_s": statistics.median(step_times) if step_times else None,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--family", default="restore", choices=["gan", "vae", "convlstm", "restore"])
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--out-json", default=os.path.join(ROOT, "bench", "results", "startup.json"))
    args = ap.parse_args()
    sys.path.insert(0, ROOT)
    from vidgen.data.synth import synthesize

    runs = []
    with tempfile.TemporaryDirectory(prefix="vidgen-startup-") as work:
        kind, size = ("shapes", 32)
        synthesize(kind=kind, clips=64, frames=8, size=size, out=os.path.join(work, "data"), seed=0, progress=False)
        for i in range(args.repeat):
            r = one_run(work, args.family, i)
            runs.append(r)
            print(f"run {i + 1}: to first step {r['to_first_step_s']:.1f} s, last step to exit "
                  f"{r['last_step_to_exit_s']:.1f} s (a step: {r['step_s']} s)")
            for name, sec in r["first_step_parts"].items():
                print(f"    start  {name:36s} {sec:6.1f} s")
            for name, sec in r["exit_parts"].items():
                print(f"    end    {name:36s} {sec:6.1f} s")
    first = statistics.median(r["to_first_step_s"] for r in runs)
    end = statistics.median(r["last_step_to_exit_s"] for r in runs)
    print(f"vidgen train, 2 workers ZeRO-2, {args.family} tiny: to first step {first:.1f} s "
          f"({'meets' if first <= 15 else 'MISSES'} <= 15 s), last step to exit {end:.1f} s "
          f"({'meets' if end <= 15 else 'MISSES'} <= 15 s)")
    os.makedirs(os.path.dirname(args.out_json), exist_ok=True)
    with open(args.out_json, "w") as f:
        json.dump({"family": args.family, "to_first_step_s": first, "last_step_to_exit_s": end, "runs": runs}, f,
                  indent=2)


if __name__ == "__main__":
    main()
