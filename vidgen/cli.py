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
import sys
from collections.abc import Callable, Sequence

from vidgen import __version__


class UserError(Exception):
    """An expected mistake in the user's input; printed as one line, exit code 2."""


def _user_errors() -> tuple[type[BaseException], ...]:
    """Exception types that are the user's to fix, not bugs: printed as one line."""
    from vidgen.storage import StorageError

    errors: list[type[BaseException]] = [UserError, StorageError]
    for module, name in [("vidgen.media", "MediaError")]:
        if module in sys.modules:
            errors.append(getattr(sys.modules[module], name))
    return tuple(errors)


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


# --------------------------------------------------------------------------------------------
# Parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vidgen",
        description="Train video generators on Ray + DeepSpeed and render video batches into object storage.",
    )
    parser.add_argument("--version", action="version", version=f"vidgen {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser("probe", help="facts of one video (local path or s3:// URI)")
    p.add_argument("uri", help="a video: /path/clip.mp4, file:///..., or s3://bucket/key")
    p.add_argument("--json", action="store_true", help="print JSON: width, height, fps, frames, seconds, ...")
    p.set_defaults(func=cmd_probe)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except KeyboardInterrupt:
        print("vidgen: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - expected mistakes become one line; bugs re-raise
        if isinstance(e, _user_errors()):
            print(f"vidgen: error: {e}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
