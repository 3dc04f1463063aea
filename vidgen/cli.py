"""The `vidgen` command: argument parsing only; every command calls a library function.

    vidgen probe clip.mp4 --json
    vidgen probe s3://bucket/clip.mp4        (endpoint from AWS_ENDPOINT_URL_S3 for MinIO/moto)

Expected mistakes (a missing file, a bad URI, a corrupt video, a bad flag) print one line,
`vidgen: error: ...`, and exit 2; heavy libraries are imported only by the command that needs them,
so `vidgen --help` is instant.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence

from vidgen import __version__
from vidgen.errors import VidgenError, run_reporting_errors


class UserError(VidgenError):
    """An expected mistake in a command's arguments; printed as one line, exit code 2."""


# --------------------------------------------------------------------------------------------
# Commands


def cmd_probe(args: argparse.Namespace) -> int:
    from vidgen import media

    info = media.probe(args.uri)
    if args.json:
        print(json.dumps(info.to_json(), indent=2))
    else:
        audio = f"audio {info.audio_codec}" if info.audio else "no audio"
        print(
            f"{args.uri}: {info.width}x{info.height} {info.video_codec}, {info.fps:g} fps, "
            f"{info.frames} frames, {info.seconds:.2f} s, {audio}"
        )
    return 0


def cmd_data_synth(args: argparse.Namespace) -> int:
    from vidgen.data import synth
    from vidgen.data.inspect import format_summary, summarize

    synth.validate_args(args.kind, args.clips, args.frames, args.size, args.val_fraction)
    synth.synthesize(
        args.kind, args.clips, args.frames, args.size, args.out, seed=args.seed, val_fraction=args.val_fraction
    )
    print(format_summary(summarize(args.out)))
    return 0


def cmd_data_ingest(args: argparse.Namespace) -> int:
    from vidgen.data import ingest
    from vidgen.data.inspect import format_summary, summarize

    ingest.ingest(args.sources, args.out, frames=args.frames, size=args.size, fps=args.fps, stride=args.stride,
                  val_fraction=args.val_fraction)
    summary = summarize(args.out)
    print(format_summary(summary))
    return 1 if summary["failed_sources"] else 0


def cmd_data_inspect(args: argparse.Namespace) -> int:
    from vidgen.data.inspect import format_summary, summarize, write_preview

    summary = summarize(args.uri)
    if args.preview:
        summary["preview"] = write_preview(args.uri, args.preview, clips=args.preview_clips)
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(format_summary(summary))
        if args.preview:
            print(f"preview   {summary['preview']}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from vidgen.train.export import ExportError, export

    try:
        manifest = export(args.run, args.model)
    except ExportError as e:
        raise UserError(str(e)) from None
    prov = manifest.provenance
    print(f"exported {manifest.family}/{manifest.preset} ({manifest.parameters:,} parameters) "
          f"from step {prov['steps']} of {prov['run']} to {args.model}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from vidgen.train.export import evaluate_model

    if args.batches < 1:
        raise UserError(f"--batches {args.batches}: expected at least 1")
    values = evaluate_model(args.model, args.data, split=args.split, batches=args.batches)
    if args.json:
        print(json.dumps(values, indent=2))
    else:
        for k, v in values.items():
            print(f"{k:>22}  {v}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from vidgen import serving

    settings_args, http = serving.read_config(args.config)
    for pair in args.model or []:
        name, sep, uri = pair.partition("=")
        if not sep or not name or not uri:
            raise UserError(f"--model {pair!r}: expected NAME=URI, e.g. --model g=s3://bucket/models/g")
        settings_args.setdefault("models", {})[name] = uri
    if args.output_root is not None:
        settings_args["output_root"] = args.output_root
    if args.input_root:
        settings_args["input_roots"] = args.input_root
    settings = serving.load_settings(settings_args)
    host = args.host or http.get("host") or "127.0.0.1"
    port = args.port if args.port is not None else int(http.get("port") or 8000)
    serving.serve_forever(settings, host, port, address=args.address)
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from vidgen import capacity

    width, height = capacity.parse_size(args.size)
    family, _, model_preset = args.model.partition("/")
    load = capacity.Load(render_minutes=args.render_minutes, width=width, height=height, fps=args.fps,
                         codec=args.codec, preset=args.preset, family=family, model_preset=model_preset or "tiny",
                         mode=args.mode, video_seconds=args.video_seconds, hours=args.hours,
                         peak_factor=args.peak_factor, train_clips_per_s=args.train_clips_per_s, train=args.train)
    for name in ("render_minutes", "fps", "video_seconds", "hours", "peak_factor", "train_clips_per_s"):
        value = getattr(load, name)
        if value < 0 or (value == 0 and name not in ("render_minutes", "train_clips_per_s")):
            raise UserError(f"--{name.replace('_', '-')} {value:g}: expected a positive number")
    figures = capacity.calibrate(load) if args.calibrate else capacity.shipped_figures(load)
    bounds = capacity.read_bounds(args.cluster, args.serve)
    rows = capacity.plan(load, figures, bounds)
    print(capacity.format_plan(load, figures, bounds, rows))
    return 1 if any("EXCEEDS" in verdict for _, _, verdict in rows) else 0


def cmd_demo(args: argparse.Namespace) -> int:
    from vidgen.demo import run_demo

    if args.minutes <= 0:
        raise UserError(f"--minutes {args.minutes}: must be positive")
    return 1 if run_demo(args.out, args.minutes).failed else 0


def cmd_submit(args: argparse.Namespace) -> int:
    from vidgen import jobs

    try:
        working_dir = None if args.no_working_dir else (args.working_dir or "auto")
        sub = jobs.build_submission(args.kind, args.spec, out=args.out, model=args.model, workers=args.workers,
                                    sets=args.set or [], working_dir=working_dir, submission_id=args.submission_id)
        if args.dry_run:
            print(json.dumps({"address": args.address or os.environ.get("RAY_ADDRESS"), **sub.describe()}, indent=2))
            return 0
        return jobs.run_submit(sub, args.address, wait=args.wait, follow=args.follow)
    except jobs.JobsError as e:
        raise UserError(str(e)) from None


def cmd_schedule(args: argparse.Namespace) -> int:
    import datetime as dt

    from vidgen import jobs

    try:
        now = None
        if args.now is not None:
            try:
                now = dt.datetime.fromisoformat(args.now)
            except ValueError:
                raise UserError(f"--now {args.now!r}: expected an ISO time, e.g. 2026-11-21T06:30:00+01:00") from None
            now = now if now.tzinfo else now.replace(tzinfo=dt.UTC)  # a time without offset is UTC
        if args.emit_kuberay:
            for uri in jobs.emit_kuberay(args.schedules, args.emit_kuberay):
                print(f"wrote {uri}")
            return 0
        if args.status:
            print(jobs.schedule_status(args.schedules, args.address, args.state, now=now))
            return 0
        return jobs.run_schedule(args.schedules, args.address, once=args.once, now=now, state_uri=args.state,
                                 dry_run=args.dry_run)
    except jobs.JobsError as e:
        raise UserError(str(e)) from None


# --------------------------------------------------------------------------------------------
# Parser


def build_parser() -> argparse.ArgumentParser:
    # `vidgen train` and `vidgen render` are also what a job runs (jobs/train.py, a submitted job):
    # their arguments and library calls live in vidgen.jobs.entry, below the CLI.
    from vidgen.jobs import entry
    from vidgen.render.spec import MODES  # the render spec's modes: one list, here and in batch files

    parser = argparse.ArgumentParser(
        prog="vidgen",
        description="Train video generators on Ray + DeepSpeed and render video batches into object storage.",
    )
    parser.add_argument("--version", action="version", version=f"vidgen {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser("demo", help="end to end on the embedded default (local Ray, a local folder)")
    p.add_argument("--out", default="demo-out", help="where everything goes: a folder or s3://bucket/prefix")
    p.add_argument("--minutes", type=float, default=10.0, help="time budget; training steps scale to it")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("probe", help="facts of one video (local path or s3:// URI)")
    p.add_argument("uri", help="a video: /path/clip.mp4, file:///..., or s3://bucket/key")
    p.add_argument("--json", action="store_true", help="print JSON: width, height, fps, frames, seconds, ...")
    p.set_defaults(func=cmd_probe)

    data = sub.add_parser("data", help="datasets of Parquet clips: synth, ingest, inspect")
    dsub = data.add_subparsers(dest="data_command", metavar="DATA_COMMAND")
    dsub.required = True
    p = dsub.add_parser("synth", help="write a procedural dataset (shapes, digits, life)")
    p.add_argument("--kind", required=True, help="shapes | digits | life")
    p.add_argument("--clips", type=int, required=True, help="number of clips")
    p.add_argument("--frames", type=int, default=16, help="frames per clip (T)")
    p.add_argument("--size", type=int, default=64, help="square frame size S (S x S)")
    p.add_argument("--out", required=True, help="dataset URI: a folder or s3://bucket/prefix")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--val-fraction", type=float, default=0.1)
    p.set_defaults(func=cmd_data_synth)

    p = dsub.add_parser("ingest", help="cut real videos into a dataset of clips")
    p.add_argument("sources", nargs="+", help="video files, folders or s3:// prefixes (mp4/webm/mov/mkv)")
    p.add_argument("--out", required=True, help="dataset URI")
    p.add_argument("--frames", type=int, required=True, help="frames per clip (T)")
    p.add_argument("--size", type=int, required=True, help="square frame size S: scaled, then centre-cropped")
    p.add_argument("--fps", type=float, default=None, help="resample to this frame rate (default: the source's)")
    p.add_argument("--stride", type=int, default=None, help="frames between clip starts (default: --frames)")
    p.add_argument("--val-fraction", type=float, default=0.1)
    p.set_defaults(func=cmd_data_ingest)

    p = dsub.add_parser("inspect", help="counts, shape, labels, pixel statistics, failed sources")
    p.add_argument("uri", help="dataset URI")
    p.add_argument("--json", action="store_true", help="print JSON: clips, shards, bytes, shape, fps, splits, ...")
    p.add_argument("--preview", metavar="FILE", help="write a grid of clips as .mp4, .webm or .gif (path or URI)")
    p.add_argument("--preview-clips", type=int, default=16)
    p.set_defaults(func=cmd_data_inspect)

    p = sub.add_parser("train", help="train a model family with Ray Train + DeepSpeed (resumes an existing run)")
    entry.add_train_arguments(p)
    p.set_defaults(func=entry.train_command)

    p = sub.add_parser("plan", help="size a cluster for a daily render and training load (docs/capacity.md)")
    p.add_argument("--render-minutes", type=float, default=0.0, help="minutes of video rendered a day")
    p.add_argument("--size", default="1280x720", help="output WIDTHxHEIGHT")
    p.add_argument("--fps", type=float, default=24.0)
    p.add_argument("--codec", choices=["h264", "vp9"], default="h264")
    p.add_argument("--preset", default="medium", help="x264 preset (vp9: its speed equivalent)")
    p.add_argument("--model", default="gan/tiny", help="FAMILY/PRESET of the rendering model")
    p.add_argument("--mode", choices=MODES, default="generate")
    p.add_argument("--video-seconds", type=float, default=10.0, help="length of one video")
    p.add_argument("--hours", type=float, default=24.0, help="the day's renders must finish within these hours")
    p.add_argument("--peak-factor", type=float, default=3.0, help="the endpoint's busiest hour / the average")
    p.add_argument("--train-clips-per-s", type=float, default=0.0, help="training throughput wanted")
    p.add_argument("--train", default="gan/small", help="FAMILY/PRESET trained")
    p.add_argument("--cluster", default=None, help="a KubeRay manifest whose worker groups bound the cluster")
    p.add_argument("--serve", default=None, help="a Serve config whose max_replicas bound the endpoint")
    p.add_argument("--calibrate", action="store_true", help="measure encode and inference on this machine")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("export", help="consolidate a run's newest checkpoint into MODEL/model.safetensors")
    p.add_argument("run", help="run URI")
    p.add_argument("model", help="model URI to write")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("eval", help="validation metrics of an exported model on a dataset split")
    p.add_argument("model", help="model URI")
    p.add_argument("data", help="dataset URI")
    p.add_argument("--split", default="val")
    p.add_argument("--batches", type=int, default=8, help="batches of 4 clips to evaluate")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("render", help="render a batch spec (YAML/JSON) of videos into object storage, on Ray")
    entry.add_render_arguments(p)
    p.set_defaults(func=entry.render_command)

    p = sub.add_parser("serve", help="the HTTP render API on Ray Serve (until Ctrl-C)")
    p.add_argument("config", nargs="?", help="a Serve config file, e.g. serve/config.yaml (default: built-in settings)")
    p.add_argument("--host", default=None, help="listen address (default: the config's, else 127.0.0.1)")
    p.add_argument("--port", type=int, default=None, help="port (default: the config's, else 8000)")
    p.add_argument("--model", action="append", metavar="NAME=URI", help="serve the model at URI as NAME (repeatable)")
    p.add_argument("--output-root", default=None, help="where renders go: s3://bucket/prefix or a folder")
    p.add_argument("--input-root", action="append", metavar="URI",
                   help="a prefix input videos may be read from (repeatable; default: none)")
    p.add_argument("--address", default=None, help="Ray address (default: RAY_ADDRESS, else a new local Ray)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("submit", help="run a training config or a render batch as a Ray job on a cluster (Jobs API)")
    p.add_argument("kind", choices=["train", "render"], help="what the job runs: vidgen train or vidgen render")
    p.add_argument("spec", help="the training config or render spec (path or s3:// URI); its content goes with the job")
    p.add_argument("--address", default=None, help="the cluster's job server, http://HEAD:8265 (default: RAY_ADDRESS)")
    p.add_argument("--out", default=None, help="render: output URI (default: the spec's)")
    p.add_argument("--model", default=None, help="render: default model URI (default: the spec's)")
    p.add_argument("--workers", type=int, default=None, help="render: concurrent encode/upload tasks")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="train: any config key (repeatable)")
    p.add_argument("--wait", action="store_true", help="wait for the job; exit with its result (0: succeeded)")
    p.add_argument("--follow", action="store_true", help="print the job's logs as they come, then exit like --wait")
    p.add_argument("--dry-run", action="store_true", help="print what would be submitted; submit nothing")
    p.add_argument("--submission-id", default=None,
                   help="the job's id (default: spec name + content hash, so a retried submit attaches to its job)")
    p.add_argument("--working-dir", default=None, help="the code to ship (default: this vidgen checkout)")
    p.add_argument("--no-working-dir", action="store_true", help="ship no code: the cluster image has vidgen installed")
    p.set_defaults(func=cmd_submit)

    p = sub.add_parser("schedule", help="submit due scheduled batches (cron + time zone), or emit KubeRay RayCronJobs")
    p.add_argument("schedules", help="a schedule file, e.g. jobs/schedules.yaml")
    p.add_argument("--address", default=None, help="the cluster's job server, http://HEAD:8265 (default: RAY_ADDRESS)")
    p.add_argument("--once", action="store_true", help="one pass over the due slots, then exit (cron-style use)")
    p.add_argument("--now", default=None, help="pretend it is this ISO time (one pass; without an offset: UTC)")
    p.add_argument("--state", default=None, help="state URI (s3:// or a file): last slot and recent runs per entry")
    p.add_argument("--status", action="store_true", help="each entry's next slot and recent runs with their job states")
    p.add_argument("--dry-run", action="store_true", help="print the due slots; submit nothing, change no state")
    p.add_argument("--emit-kuberay", metavar="DIR", default=None,
                   help="write the equivalent KubeRay RayCronJob manifests into DIR instead")
    p.set_defaults(func=cmd_schedule)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    return run_reporting_errors(lambda: func(args))


if __name__ == "__main__":
    sys.exit(main())
