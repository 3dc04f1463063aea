"""One base for the problems a user can fix, so the CLI knows them without guessing.

    VidgenError                 printed by `vidgen` as one line, `vidgen: error: ...`, exit 2
      InputError (ValueError)   a bad value: a flag, a setting, a spec field (names the value)
      storage.StorageError      a missing object, a bucket, access, a failed request
      media.MediaError          a video ffmpeg cannot read or write
      data.format.DatasetError  no dataset, a bad manifest or shard, a version that is gone
      train.config.ConfigError  a training config (also a ValueError)
      train.export.ExportError  a run that cannot be exported (also a ValueError)
      render.spec.SpecError     a render spec (also a ValueError)
      jobs.JobsError            a job submission or schedule (also a ValueError)

Any other exception is a bug: the CLI lets it show its traceback.
"""

from __future__ import annotations

import sys
from collections.abc import Callable


class VidgenError(Exception):
    """A problem with the user's input or environment, which they can fix; its message says what."""


class InputError(VidgenError, ValueError):
    """A bad value given by the user (a flag, a setting, a field); the message names it."""


def run_reporting_errors(command: Callable[[], int]) -> int:
    """Run a command of `vidgen` (or a job script), its exit code: a VidgenError is the user's to fix,
    printed as one line, `vidgen: error: ...`, exit 2; Ctrl-C, exit 130. Any other exception is a bug
    and shows its traceback."""
    try:
        return command()
    except KeyboardInterrupt:
        print("vidgen: interrupted", file=sys.stderr)
        return 130
    except VidgenError as e:
        print(f"vidgen: error: {e}", file=sys.stderr)
        return 2
