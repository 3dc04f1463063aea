"""Run every benchmark and write the README's benchmark table from their output.

    python bench/run_all.py                 # all of them, about an hour on 2 cores (bf16 on a CPU is slow)
    python bench/run_all.py --only loader media

Each benchmark prints its own report (kept in bench/results/<name>.txt) and writes its figures as
JSON (bench/results/<name>.json); this script turns those into one markdown table and replaces
the README between `<!-- bench:begin -->` and `<!-- bench:end -->`, so the README's figures are
always a run's output, never typed by hand. bench/results/table.md and table.json hold the same.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Callable

from harness import machine

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "bench", "results")
BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"


def _loader(r: dict) -> list[tuple[str, str]]:
    return [("loader: Ray Data Parquet vs DataLoader decoding one mp4 per clip (target >= 10x)",
             f"{r['ratio_vs_baseline']:.1f}x ({r['ours']['clips_per_s']:.0f} vs {r['baseline']['clips_per_s']:.0f} clips/s); "
             f"{100 * r['fraction_of_decode_only']:.0f}% of the decode-only limit")]


def _media(r: dict) -> list[tuple[str, str]]:
    return [(f"media: {name} at {r['settings']['size']}x{r['settings']['size']}, ours vs the ffmpeg CLI",
             f"encode {c['encode_fps']:.0f} fps ({c['encode_ratio']:.2f}x), decode {c['decode_fps']:.0f} fps ({c['decode_ratio']:.2f}x)")
            for name, c in r["cases"].items()]


def _train(r: dict) -> list[tuple[str, str]]:
    rows = []
    for family in ("gan", "restore"):
        if f"overhead_{family}" in r:
            o = r[f"overhead_{family}"]
            rows.append((f"train overhead: vidgen 1 worker ZeRO-0 vs plain PyTorch, {family} small (target >= 0.9)",
                         f"{o['ratio']:.2f} ({o['vidgen_1w_clips_s']:.2f} vs {o['plain_clips_s']:.2f} clips/s)"))
        if f"scaling_{family}" in r:
            s = r[f"scaling_{family}"]
            rows.append((f"train scaling: 2 workers vs 1, {family} small (target >= 1.6x)",
                         f"{s['ratio']:.2f}x ({s['2w_clips_s']:.2f} vs {s['1w_clips_s']:.2f} clips/s)"))
    for key, precision in (("sharding_gan_small", "fp32"), ("sharding_gan_small_bf16", "bf16")):
        if key in r:
            h = r[key]
            rows.append((f"train sharding: model-state bytes per rank vs ZeRO-0, gan small {precision}, 2 ranks "
                         f"(target stage 3 <= 0.55x)",
                         ", ".join(f"stage {s}: {v['ratio']:.2f}x" for s, v in h.items())
                         + f" (stage 0: {h['0']['total'] / 2**20:.0f} MiB)"))
    return rows


def _models(r: dict) -> list[tuple[str, str]]:
    rows = []
    if "sizes" in r:
        for preset in ("tiny", "small", "base"):
            cells = [f"{key.split('/')[0]} {v['params'] / 1e6:.2f}M {v['fwd_bwd_s'] * 1000:.0f} ms"
                     for key, v in r["sizes"].items() if key.endswith(f"/{preset}")]
            rows.append((f"models {preset}: parameters, forward+backward of one training step (batch 2)", "; ".join(cells)))
    if "restore" in r:
        x = r["restore"]
        p = x["psnr_db"]
        kinds = "+".join(x["config"]["degradations"])
        rows.append((f"restore vs ffmpeg denoisers: PSNR after {x['train_seconds']:.0f} s of in-process CPU training, "
                     f"{kinds} (the targets are for 15 minutes: the quality denoise row)",
                     f"ours {p['ours']:.2f} dB: {x['gain_vs_degraded_db']:+.2f} dB over the degraded input "
                     f"({p['degraded']:.2f}), {x['gain_vs_best_filter_db']:+.2f} dB over {x['best_filter']} "
                     f"({p[x['best_filter']]:.2f}; hqdn3d {p['hqdn3d']:.2f}, nlmeans {p['nlmeans']:.2f})"))
    return rows


def _quality(r: dict) -> list[tuple[str, str]]:
    rows = []
    for name, family in r.get("families", {}).items():
        run = family.get("run") or {}
        head = (f"{run['wall_minutes']:.1f} min, {run['steps']} steps ({run['steps_per_s']:.2f}/s): "
                if run else "")
        cells = [f"{f['figure'].split(': ', 1)[-1]} {f['value']:.3f}{f['unit']} vs {f['baseline']} "
                 f"{f['baseline_value']:.3f}{f['unit']} ({'meets target' if f['met'] else 'MISSES target' if f['met'] is False else 'report'})"
                 for f in family["figures"]]
        changed = ", ".join(f"{k}={v}" for k, v in family.get("set", {}).items())
        setting = f", with {changed} (quality.py --set)" if changed else ""
        rows.append((f"quality: {name}, trained through vidgen train (2 workers, ZeRO-2){setting}, held-out clips",
                     head + "; ".join(cells), family.get("_machine")))
    return rows


def _startup(r: dict) -> list[tuple[str, str]]:
    return [(f"train fixed costs: vidgen train (2 workers, ZeRO-2, {r['family']} tiny) to first step, last step to "
             f"exit (target <= 15 s each)",
             f"{r['to_first_step_s']:.1f} s to first step, {r['last_step_to_exit_s']:.1f} s last step to exit")]


def _summary_rows(r: dict) -> list[tuple[str, str]]:
    """Benchmarks that format their own rows: {"summary_rows": [[benchmark, figure], ...]}."""
    return [tuple(row) for row in r.get("summary_rows", [])]


BENCHES: dict[str, tuple[list[str], Callable[[dict], list[tuple[str, str]]]]] = {
    "loader": ([], _loader),
    "media": ([], _media),
    "train": ([], _train),
    "render": ([], _summary_rows),
    "serve": ([], _summary_rows),
    "restore_memory": ([], _summary_rows),
    "models": ([], _models),
    "quality": ([], _quality),
    "startup": ([], _startup),
}


def run(name: str, extra: list[str]) -> dict | None:
    os.makedirs(RESULTS, exist_ok=True)
    out_json = os.path.join(RESULTS, f"{name}.json")
    cmd = [sys.executable, os.path.join("bench", f"{name}.py"), *BENCHES[name][0], *extra, "--out-json", out_json]
    print(f"== {' '.join(cmd[1:])}", flush=True)
    started = time.perf_counter()
    with open(os.path.join(RESULTS, f"{name}.txt"), "w") as log:
        proc = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=log, text=True)
        log.write(proc.stdout)
    print(proc.stdout, flush=True)
    if proc.returncode != 0:
        print(f"!! bench/{name}.py failed (exit {proc.returncode}); see bench/results/{name}.txt", flush=True)
        return None
    with open(out_json) as f:
        result = json.load(f)
    result["_seconds"] = round(time.perf_counter() - started, 1)
    result["_machine"] = machine()  # each result keeps the machine it ran on (--only keeps older ones)
    return result


def table(rows: list[dict]) -> str:
    lines = ["Written by `python bench/run_all.py` from each benchmark's latest run.", "",
             "| benchmark | figure | command | machine |", "|---|---|---|---|"]
    lines += [f"| {r['benchmark']} | {r['figure']} | `{r['command']}` | {r['machine']} |" for r in rows]
    return "\n".join(lines)


def update_readme(text: str) -> None:
    path = os.path.join(ROOT, "README.md")
    with open(path) as f:
        readme = f.read()
    if BEGIN not in readme or END not in readme:
        raise SystemExit(f"README.md has no {BEGIN} ... {END} markers")
    head, rest = readme.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    with open(path, "w") as f:
        f.write(f"{head}{BEGIN}\n{text}\n{END}{tail}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="*", choices=sorted(BENCHES), help="run only these (others keep their last figures)")
    ap.add_argument("--no-readme", action="store_true", help="do not rewrite README.md")
    ap.add_argument("--table", action="store_true", help="run nothing: rewrite the table from bench/results/")
    ap.add_argument("--args", default="", help="extra arguments for the benchmarks run, e.g. --only models "
                                                "--args='--only restore': the figures they give replace the "
                                                "same keys of the last full run's, the rest are kept")
    args = ap.parse_args()
    names = [] if args.table else args.only or list(BENCHES)
    for name in names:
        path = os.path.join(RESULTS, f"{name}.json")
        previous = {}
        if args.args and os.path.exists(path):
            with open(path) as f:
                previous = json.load(f)
        result = run(name, shlex.split(args.args))
        if result is not None:
            with open(path, "w") as f:
                json.dump({**previous, **result}, f, indent=2)
    rows = []
    for name, (_, fmt) in BENCHES.items():  # every benchmark's latest figures, in a fixed order
        path = os.path.join(RESULTS, f"{name}.json")
        if not os.path.exists(path):
            continue
        with open(path) as f:
            result = json.load(f)
        where = result.get("_machine", "unrecorded")
        # a row may name its own machine (a family of bench/quality.py kept from an earlier run)
        rows += [{"benchmark": b, "figure": fig, "command": f"python bench/{name}.py", "machine": own[0] or where}
                 for b, fig, *own in (row + (None,) for row in fmt(result))]
    text = table(rows)
    with open(os.path.join(RESULTS, "table.md"), "w") as f:
        f.write(text + "\n")
    with open(os.path.join(RESULTS, "table.json"), "w") as f:
        json.dump({"rows": rows}, f, indent=2)
    if not args.no_readme:
        update_readme(text)
    print(text)


if __name__ == "__main__":
    main()
