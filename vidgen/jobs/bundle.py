"""What travels with a job: the spec's content, never a path the cluster may not have.

The spec file (and an `items_from` CSV beside it) is packed into a `SpecBundle`, compressed into the
job's environment as VIDGEN_JOB_SPEC, and written to a temp folder by the job's entrypoint
(`vidgen.jobs.entry.run_job`). A spec that is wrong as a whole is rejected here (`read_spec`),
before anything is submitted.

    >>> bundle, name = read_spec("render", "jobs/batches/ads.yaml")
    >>> SpecBundle.decode(bundle.encode()) == bundle
    True
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import posixpath
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from vidgen import storage
from vidgen.errors import InputError

Kind = Literal["train", "render"]
KINDS = ("train", "render")

SPEC_ENV = "VIDGEN_JOB_SPEC"
# An environment string is at most 128 KiB on Linux; a spec (compressed) must fit well inside.
MAX_SPEC_BYTES = 96 * 1024


class JobsError(InputError):
    """A submission or schedule that cannot go ahead; the message names the value to fix."""


@dataclass(frozen=True)
class SpecBundle:
    """A spec file's content, plus the files beside it that it names (a render spec's items_from)."""

    kind: str
    name: str  # the spec's file name, e.g. ads.yaml
    files: dict[str, str]  # relative path -> text; files[name] is the spec itself
    read_there: dict[str, str] = field(default_factory=dict)  # s3:// files the job reads in place -> their sha256

    def encode(self) -> str:
        raw = json.dumps({"kind": self.kind, "name": self.name, "files": self.files, "read_there": self.read_there},
                         sort_keys=True).encode()
        return base64.b64encode(zlib.compress(raw, 9)).decode("ascii")

    @classmethod
    def decode(cls, text: str) -> SpecBundle:
        data = json.loads(zlib.decompress(base64.b64decode(text)))
        return cls(kind=data["kind"], name=data["name"], files=dict(data["files"]),
                   read_there=dict(data.get("read_there") or {}))

    def write(self, folder: str) -> str:
        """Write the files under `folder`; returns the spec's path."""
        for rel, text in self.files.items():
            parts = rel.split("/")
            if rel.startswith("/") or ".." in parts or not all(parts):
                raise JobsError(f"spec bundle: unsafe file name {rel!r}")
            path = os.path.join(folder, *parts)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "w", encoding="utf-8") as f:
                f.write(text)
        return os.path.join(folder, self.name)


def read_spec(kind: str, uri: str, out: str | None = None, model: str | None = None,
              sets: Sequence[str] = ()) -> tuple[SpecBundle, str]:
    """Read and validate a spec (local or s3://) the way its job will; returns (bundle, spec name).

    A spec that is wrong as a whole fails here, before anything is submitted."""
    if kind not in KINDS:
        raise JobsError(f"job kind {kind!r}: expected one of {', '.join(KINDS)}")
    text = storage.read_spec_text(uri, f"{kind} spec", JobsError)
    spec_file = posixpath.basename(str(uri).rstrip("/").replace("\\", "/")) or f"{kind}.yaml"
    files = {spec_file: text}
    read_there: dict[str, str] = {}
    if kind == "render":
        from vidgen.render.spec import SpecError, load_batch

        try:
            batch = load_batch(uri, out=out, model=model)
        except SpecError as e:
            raise JobsError(str(e)) from None
        name = batch.name
        if batch.items_from is not None:
            ref = batch.items_from
            if storage.is_s3(ref):  # the cluster reads it there; its content still names the job
                read_there[ref] = hashlib.sha256(storage.read_bytes(ref)).hexdigest()
            elif "://" in ref or ref.startswith(("/", "~")) or ".." in ref.replace("\\", "/").split("/"):
                raise JobsError(f"{uri}: items_from {ref!r}: only a file beside the spec (or below it) or an "
                                "s3:// URI travels with a job")
            else:  # read from beside the spec, as load_batch did; it lands beside the spec's copy
                files[ref.replace("\\", "/")] = storage.read_text(
                    storage.join(storage.parent(storage.normalize(uri)), ref.replace("\\", "/")))
    else:
        if out is not None or model is not None:
            raise JobsError("--out and --model are render options; a training config names its run and data")
        from vidgen.train.config import ConfigError, load_config

        try:
            load_config(uri, {}, list(sets))
        except ConfigError as e:
            raise JobsError(str(e)) from None
        name = Path(spec_file).stem
    return SpecBundle(kind=kind, name=spec_file, files=files, read_there=read_there), name
