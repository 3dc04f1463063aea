"""Running a benchmark's families one after another (bench/quality.py, bench/gpu.py).

Each family's failure is printed and costs only its own figures; after each family its figure rows
go into `report["families"]` and the report is rewritten, so an interrupted run keeps what it measured.
"""

from __future__ import annotations

import json
import os
import traceback
from collections.abc import Callable, Iterable

from harness import machine

from vidgen import quality


def kept_families(out_json: str) -> dict:
    """The families of an earlier report at `out_json`, each with the machine it ran on (a report
    written before families kept their own has it once, for all of them)."""
    with open(out_json) as f:
        old = json.load(f)
    return {name: {"_machine": old.get("_machine"), **family} for name, family in old.get("families", {}).items()}


def run_families(names: Iterable[str], run: Callable[[str], dict], report: dict, out_json: str,
                 describe: Callable[[str, dict], str | None] = lambda name, result: None) -> None:
    """`run(name)` -> {"figures": [Figure, ...], ...} for each name; `describe` gives an optional
    line printed above the family's table."""
    for name in names:
        print(f"\n=== {name} ===", flush=True)
        try:
            result = run(name)
        except Exception as e:  # noqa: BLE001 - one family's failure must not cost the others' figures
            traceback.print_exc()
            print(f"!! {name} failed: {e}", flush=True)
            continue
        result["figures"] = [f.row() for f in result["figures"]]
        result["_machine"] = machine()  # each family's own: a run of some families keeps the others' last ones
        report["families"][name] = result
        report["_machine"] = machine()  # run directly (not through run_all.py), the table still knows where
        line = describe(name, result)
        if line:
            print(line)
        print(quality.table(result["figures"]), flush=True)
        os.makedirs(os.path.dirname(out_json), exist_ok=True)
        with open(out_json, "w") as f:
            json.dump(report, f, indent=2, default=float)
