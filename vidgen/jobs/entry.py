"""The commands a job runs, `vidgen train` and `vidgen render`, and a submitted job's entrypoint.

    python -m vidgen.jobs run render --out s3://bucket/renders/ads   # a submitted job's entrypoint (run_job)
    python jobs/train.py jobs/train/gan-gpu.yaml --set max_steps=1000  # `ray job submit -- ...`: `vidgen train`
    python jobs/render.py jobs/batches/ads.yaml --workers 2           # CPU-sized: `vidgen render` on a local Ray

The arguments and library calls of `vidgen train` and `vidgen render` live here rather than in the
CLI: the `vidgen` command, the job scripts jobs/train.py and jobs/render.py, and a job started by
`vidgen submit` or a RayCronJob all run them, and nothing below the CLI imports the CLI.

A job's spec is the one that travelled with it (VIDGEN_JOB_SPEC, a `SpecBundle`), or --spec PATH (a
KubeRay ConfigMap mounted into the head pod).
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import shlex
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence

from vidgen.errors import InputError, run_reporting_errors
from vidgen.jobs.bundle import KINDS, SPEC_ENV, SpecBundle
from vidgen.jobs.schedule import check_timezone

# --------------------------------------------------------------------------------------------
# `vidgen train` and `vidgen render`


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    """`vidgen train`'s arguments: a config file, every TrainConfig field as a flag, --set, --address."""
    p.add_argument("config", nargs="?", help="a YAML training config (every key is also a flag)")
    _add_config_flags(p)
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="any config key, e.g. model.g_width=64")
    p.add_argument("--address", default=None, help="Ray address (default: RAY_ADDRESS, else a new local Ray)")


def _add_config_flags(p: argparse.ArgumentParser) -> None:
    """Every TrainConfig field is also a flag (`--zero-stage 3` for zero_stage)."""
    import typing

    from vidgen.train.config import TrainConfig

    for name, field in TrainConfig.model_fields.items():
        if name == "model":
            continue
        flag = "--" + name.replace("_", "-")
        help_text = field.description or ""
        if field.annotation is bool:
            p.add_argument(flag, dest=name, action="store_true", default=None, help=help_text)
            continue
        args = [a for a in typing.get_args(field.annotation) if a is not type(None)]
        literal = typing.get_args(args[0]) if args and typing.get_origin(args[0]) is typing.Literal else ()
        if typing.get_origin(field.annotation) is typing.Literal:
            literal = typing.get_args(field.annotation)
        kind = type(literal[0]) if literal else (args[0] if args and args[0] in (int, float, str) else field.annotation)
        if kind not in (int, float, str):
            kind = str
        p.add_argument(flag, dest=name, type=kind, default=None, choices=literal or None, help=help_text)


def train_command(args: argparse.Namespace) -> int:
    """`vidgen train CONFIG`: exit 0 when training finished, 128 + N when signal N stopped it at a
    checkpoint (run it again: it resumes)."""
    from vidgen.train.config import ConfigError, TrainConfig, load_config
    from vidgen.train.trainer import format_result, train

    flags = {name: getattr(args, name) for name in TrainConfig.model_fields if name != "model" and hasattr(args, name)}
    try:
        cfg = load_config(args.config, flags, args.set or [])
        result = train(cfg, address=args.address)  # validates data, model and resume before Ray starts
    except ConfigError as e:
        raise InputError(str(e)) from None
    print(format_result(result))
    if result.stopped_by:  # checkpointed but not finished: a job runner should run it again
        from vidgen.runtime import signal_exit_code

        return signal_exit_code(result.stopped_by)
    return 0


def add_render_arguments(p: argparse.ArgumentParser) -> None:
    """`vidgen render`'s arguments: a batch spec, --out, --model, --workers, --dry-run, --address."""
    p.add_argument("batch", help="render spec: a YAML or JSON file (path or s3:// URI)")
    p.add_argument("--out", default=None, help="output URI (default: the spec's output)")
    p.add_argument("--model", default=None, help="default model URI (default: the spec's model)")
    p.add_argument("--workers", type=int, default=None,
                   help="concurrent encode/upload tasks (default: two per CPU of the cluster, at most 16; 0: no Ray)")
    p.add_argument("--dry-run", action="store_true", help="validate the spec and print the plan; render nothing")
    p.add_argument("--address", default=None, help="Ray address (default: RAY_ADDRESS, else a new local Ray)")


def render_command(args: argparse.Namespace) -> int:
    """`vidgen render SPEC`: exit 0 when every item rendered, 1 when some failed (named), 128 + N when
    signal N stopped it early (run it again: the rerun renders what is left)."""
    from vidgen.render.spec import SpecError, load_batch

    try:
        batch = load_batch(args.batch, out=args.out, model=args.model)
        if args.dry_run:
            from vidgen.render.batch import format_plan, plan_batch

            plan = plan_batch(batch)
            print(format_plan(plan))
            return 1 if plan.failing else 0
        from vidgen.render.batch import render_batch

        if args.workers is not None and args.workers < 0:
            raise InputError(f"--workers {args.workers}: expected 0 (in this process) or more")
        result = render_batch(batch, workers=args.workers, address=args.address)
    except SpecError as e:
        raise InputError(str(e)) from None
    print(result.summary())
    if result.failed:
        print(f"vidgen: {len(result.failed)} item(s) failed: {', '.join(result.failed)}", file=sys.stderr)
    if result.stopped_by:  # a job runner should run it again: the rerun renders what is left
        from vidgen.runtime import signal_exit_code

        return signal_exit_code(result.stopped_by)
    return 1 if result.failed else 0


COMMANDS: dict[str, tuple[Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]] = {
    "train": (add_train_arguments, train_command),
    "render": (add_render_arguments, render_command),
}


def run_command(kind: str, argv: Sequence[str]) -> int:
    """`vidgen KIND ARGS...` (KIND train or render) without the CLI, its exit code: what the job
    scripts jobs/train.py and jobs/render.py run. An expected mistake prints one line, exit 2."""
    add_arguments, command = COMMANDS[kind]
    parser = argparse.ArgumentParser(prog=f"vidgen {kind}")
    add_arguments(parser)
    args = parser.parse_args(list(argv))
    return run_reporting_errors(lambda: command(args))


# --------------------------------------------------------------------------------------------
# The job's entrypoint on the cluster


def job_output(template: str, timezone: str, cron: str | None, now: dt.datetime) -> str:
    """The output of a job started at `now` from a template with {date} (and {time}) in `timezone`.

    With `cron`, the slot is the schedule's newest one at or before `now`, so a job that starts late
    (past midnight, say) still renders into its slot's date; without, the slot is `now`.
    """
    slot = now.astimezone(check_timezone(timezone))
    if cron:
        from croniter import croniter

        slot = croniter(cron, slot + dt.timedelta(seconds=1)).get_prev(dt.datetime)
    return template.format(date=f"{slot:%Y-%m-%d}", time=f"{slot:%H%M}")


def run_job(argv: Sequence[str]) -> int:
    """`python -m vidgen.jobs run KIND [--spec PATH] [--out-template T --timezone Z] [ARGS...]`

    Runs `vidgen KIND SPEC ARGS...` on the cluster. The spec is the one that travelled with the job
    (VIDGEN_JOB_SPEC), or --spec PATH (a KubeRay ConfigMap mounted into the head pod).
    --out-template renders into `T` with {date} = today in time zone Z, or with `--cron EXPR` the date
    of EXPR's newest slot at or before now (a RayCronJob's slot, even when the job starts late)."""
    p = argparse.ArgumentParser(prog="python -m vidgen.jobs run")
    p.add_argument("kind", choices=KINDS)
    p.add_argument("--spec", default=None)
    p.add_argument("--out-template", default=None)
    p.add_argument("--timezone", default="UTC")
    p.add_argument("--cron", default=None, help="the schedule that started this job: {date} is its newest slot")
    ns, rest = p.parse_known_args(list(argv))
    spec = ns.spec
    folder = None
    if spec is None:
        encoded = os.environ.get(SPEC_ENV)
        if not encoded:
            print(f"vidgen: error: no spec: give --spec PATH, or submit with `vidgen submit` (it sets {SPEC_ENV})",
                  file=sys.stderr)
            return 2
        bundle = SpecBundle.decode(encoded)
        folder = tempfile.mkdtemp(prefix="vidgen-job-")
        spec = bundle.write(folder)
    args = [ns.kind, spec, *rest]
    if ns.out_template is not None:
        args += ["--out", job_output(ns.out_template, ns.timezone, ns.cron, dt.datetime.now(dt.UTC))]
    print(f"vidgen job: vidgen {shlex.join(args)}", flush=True)
    try:
        return _run_child(args)
    finally:
        if folder:
            import shutil

            shutil.rmtree(folder, ignore_errors=True)


def _run_child(args: list[str]) -> int:
    """`vidgen ARGS` (`python -m vidgen.jobs KIND ...`) in a child process, its exit code: the spec's
    temp folder is removed however the command ends. SIGTERM and SIGINT are passed on, so a job that
    is stopped or preempted stops the command as it would stop `vidgen` itself."""
    child = subprocess.Popen([sys.executable, "-m", "vidgen.jobs", *args])

    def forward(signum, _frame) -> None:
        child.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        return child.wait()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m vidgen.jobs run KIND ...` (run_job), or `python -m vidgen.jobs KIND ARGS...` (run_command)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "run":
        return run_job(argv[1:])
    if argv and argv[0] in KINDS:
        return run_command(argv[0], argv[1:])
    print("usage: python -m vidgen.jobs run {train,render} [--spec PATH] [ARGS...]\n"
          "       python -m vidgen.jobs {train,render} ARGS...   (vidgen train / vidgen render)", file=sys.stderr)
    return 2
