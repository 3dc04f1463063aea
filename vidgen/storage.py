"""One way to address data everywhere: `s3://bucket/key` URIs and local paths.

A location is a URI: `s3://bucket/prefix` or a local path (`/abs`, `rel/dir`, `file:///abs`).
S3 settings come only from the standard AWS sources: the boto3 credential chain (env, profile,
instance/pod identity), `AWS_ENDPOINT_URL_S3` / `AWS_ENDPOINT_URL` for S3-compatible servers
(MinIO, moto, Ceph, R2), `AWS_RETRY_MODE` / `AWS_MAX_ATTEMPTS` for botocore's retries. The boto3
client and pyarrow's S3FileSystem are built here, from the same settings.

vidgen's own settings (not credentials):
    VIDGEN_S3_SSE          server-side encryption: `AES256` (SSE-S3) or `aws:kms` (SSE-KMS)
    VIDGEN_S3_SSE_KMS_KEY_ID  the KMS key id for `aws:kms` (default: the bucket's AWS-managed key)

Publishing is atomic: `publish()` writes a multi-object output's objects first and its marker
(a JSON manifest) last; `read_marker()` treats an output without its marker as absent.

    >>> from vidgen import storage
    >>> storage.write_bytes("s3://bucket/a/b.json", b"{}")
    >>> storage.read_bytes("/tmp/x/b.json")
"""

from __future__ import annotations

import functools
import io
import json
import os
import posixpath
import re
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlsplit, urlunsplit

import boto3
import botocore.config
import botocore.exceptions

from vidgen.errors import VidgenError

# Objects at or above this size go up as multipart uploads, in parts of half of it (S3 wants parts of
# at least 5 MiB but the last; VIDGEN_S3_MULTIPART_BYTES lowers it for servers that take less, as tests do).
MULTIPART_THRESHOLD = int(os.environ.get("VIDGEN_S3_MULTIPART_BYTES") or 16 * 1024 * 1024)
PART_SIZE = max(1, MULTIPART_THRESHOLD // 2)

CONTENT_TYPES = {
    ".mp4": "video/mp4",
    ".webm": "video/webm",
    ".jpg": "image/jpeg",
    ".jpeg": "image/jpeg",
    ".png": "image/png",
    ".gif": "image/gif",
    ".html": "text/html; charset=utf-8",
    ".json": "application/json",
    ".jsonl": "application/x-ndjson",
    ".yaml": "application/yaml",
    ".yml": "application/yaml",
    ".csv": "text/csv",
    ".txt": "text/plain; charset=utf-8",
    ".vtt": "text/vtt",
    ".srt": "application/x-subrip",
    ".m4a": "audio/mp4",
    ".mp3": "audio/mpeg",
    ".parquet": "application/vnd.apache.parquet",
}


class StorageError(VidgenError):
    """A storage operation failed; the message names the URI and the cause."""


class NotFoundError(StorageError, FileNotFoundError):
    """No such key, file or bucket."""


class NoSuchBucketError(NotFoundError):
    """The bucket itself does not exist: a configuration mistake, never "this object is absent"."""


class AccessDeniedError(StorageError, PermissionError):
    """The credentials in use may not do this."""


# --------------------------------------------------------------------------------------------
# URIs


def is_s3(uri: str | os.PathLike) -> bool:
    return str(uri).startswith("s3://")


def split_s3(uri: str) -> tuple[str, str]:
    """`s3://bucket/key` -> (bucket, key). Malformed URIs raise StorageError naming the URI."""
    parts = urlsplit(uri)
    bucket = parts.netloc
    if parts.scheme != "s3" or not bucket or "@" in bucket or ":" in bucket:
        raise StorageError(f"malformed S3 URI {uri!r}: expected s3://bucket/key")
    if not 3 <= len(bucket) <= 63:
        raise StorageError(f"malformed S3 URI {uri!r}: bucket names have 3 to 63 characters")
    return bucket, parts.path.lstrip("/")


def local_path(uri: str | os.PathLike) -> str:
    """A local URI (`/abs`, `rel`, `file:///abs`) -> an absolute filesystem path."""
    s = os.fspath(uri)
    if is_s3(s):
        raise StorageError(f"{s!r} is an S3 URI, not a local path")
    if s.startswith("file://"):
        parts = urlsplit(s)
        if parts.netloc not in ("", "localhost"):
            raise StorageError(f"malformed file URI {s!r}: expected file:///absolute/path")
        s = parts.path
    elif "://" in s:
        scheme = s.split("://", 1)[0]
        raise StorageError(f"unsupported URI scheme {scheme!r} in {s!r}: use s3://, file:// or a path")
    if not s:
        raise StorageError("empty path")
    return os.path.abspath(os.path.expanduser(s))


def normalize(uri: str | os.PathLike) -> str:
    """The canonical form of a URI: S3 URIs validated, local paths made absolute.

    Call this before a URI is handed to Ray workers: they run with another working directory.
    """
    s = os.fspath(uri)
    if is_s3(s):
        split_s3(s)
        return s
    return local_path(s)


def join(uri: str, *parts: str) -> str:
    """Join path segments onto a URI with `/` (for S3) or the OS separator (local)."""
    if is_s3(uri):
        return "/".join([uri.rstrip("/"), *(p.strip("/") for p in parts if p)])
    return os.path.join(local_path(uri), *parts)


def parent(uri: str) -> str:
    if is_s3(uri):
        bucket, key = split_s3(uri)
        return f"s3://{bucket}/{posixpath.dirname(key.rstrip('/'))}".rstrip("/")
    return os.path.dirname(local_path(uri).rstrip(os.sep))


def basename(uri: str) -> str:
    return posixpath.basename(uri.rstrip("/")) if is_s3(uri) else os.path.basename(local_path(uri).rstrip(os.sep))


def content_type_for(uri: str) -> str:
    return CONTENT_TYPES.get(posixpath.splitext(str(uri).lower())[1], "application/octet-stream")


# --------------------------------------------------------------------------------------------
# Clients, built in one place from the standard AWS settings


@dataclass(frozen=True)
class S3Settings:
    endpoint_url: str | None
    region: str | None
    sse: str | None
    sse_kms_key_id: str | None

    @classmethod
    def from_env(cls) -> S3Settings:
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None
        region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or None
        sse = os.environ.get("VIDGEN_S3_SSE") or None
        if sse not in (None, "AES256", "aws:kms"):
            raise StorageError(f"VIDGEN_S3_SSE={sse!r}: expected AES256 or aws:kms")
        return cls(endpoint, region, sse, os.environ.get("VIDGEN_S3_SSE_KMS_KEY_ID") or None)

    def put_args(self, content_type: str, metadata: Mapping[str, str] | None = None) -> dict[str, Any]:
        """Extra arguments for every upload: content type, user metadata, server-side encryption."""
        args: dict[str, Any] = {"ContentType": content_type}
        if metadata:
            args["Metadata"] = _check_metadata(metadata)
        if self.sse:
            args["ServerSideEncryption"] = self.sse
            if self.sse == "aws:kms" and self.sse_kms_key_id:
                args["SSEKMSKeyId"] = self.sse_kms_key_id
        return args


def _check_metadata(metadata: Mapping[str, str]) -> dict[str, str]:
    """S3 user metadata (`x-amz-meta-*`): lower-case ASCII keys and printable ASCII values."""
    out = {}
    for key, value in metadata.items():
        if not re.fullmatch(r"[a-z0-9][a-z0-9-]*", str(key)):
            raise StorageError(f"metadata key {key!r}: expected lower-case letters, digits and '-'")
        value = str(value)
        if not all(32 <= ord(c) < 127 for c in value):
            raise StorageError(f"metadata {key}={value!r}: expected printable ASCII")
        out[str(key)] = value
    return out


def _redact(url: str | None) -> str:
    """An endpoint URL without any user:password part."""
    if not url:
        return "AWS S3"
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.port:
        host += f":{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


@functools.lru_cache(maxsize=None)
def _client(settings: S3Settings):
    # Retries: botocore's own modes. AWS_RETRY_MODE / AWS_MAX_ATTEMPTS win when set.
    config = botocore.config.Config(
        retries={
            "mode": os.environ.get("AWS_RETRY_MODE", "standard"),
            "max_attempts": int(os.environ.get("AWS_MAX_ATTEMPTS", "5")),
        },
        max_pool_connections=32,
    )
    session = boto3.session.Session()
    return session.client("s3", endpoint_url=settings.endpoint_url, region_name=settings.region, config=config)


def s3_client():
    """The boto3 S3 client for the current settings (cached; thread-safe)."""
    return _client(S3Settings.from_env())


def reset_clients() -> None:
    """Forget cached clients (after the environment's AWS settings change)."""
    _client.cache_clear()
    _pyarrow_s3.cache_clear()


@functools.lru_cache(maxsize=None)
def _pyarrow_s3(settings: S3Settings):
    import pyarrow.fs as pafs

    kwargs: dict[str, Any] = {}
    if settings.region:
        kwargs["region"] = settings.region
    if settings.endpoint_url:
        parts = urlsplit(settings.endpoint_url)
        kwargs["endpoint_override"] = f"{parts.hostname}:{parts.port}" if parts.port else parts.hostname
        kwargs["scheme"] = parts.scheme or "https"
    # The same attempts as botocore's (AWS_MAX_ATTEMPTS, default 5) for what Ray Data and Ray Train
    # move through pyarrow: dataset shards and checkpoints. pyarrow has no SSE-S3/KMS setting, so
    # those objects get the bucket's default encryption (set one on the bucket when it matters).
    kwargs["retry_strategy"] = pafs.AwsStandardS3RetryStrategy(max_attempts=int(os.environ.get("AWS_MAX_ATTEMPTS", "5")))
    # Credentials: pyarrow follows the same AWS default chain (env, profile, instance/pod identity).
    return pafs.S3FileSystem(**kwargs)


def pyarrow_filesystem(uri: str):
    """(pyarrow FileSystem, path inside it) for a URI: S3FileSystem or LocalFileSystem."""
    import pyarrow.fs as pafs

    if is_s3(uri):
        bucket, key = split_s3(uri)
        return _pyarrow_s3(S3Settings.from_env()), f"{bucket}/{key}".rstrip("/")
    return pafs.LocalFileSystem(), local_path(uri)


# --------------------------------------------------------------------------------------------
# Errors: name the URI and the cause, never credentials


def _translate(uri: str, exc: BaseException) -> StorageError:
    if isinstance(exc, StorageError):
        return exc
    if isinstance(exc, botocore.exceptions.ClientError):
        err = exc.response.get("Error", {})
        code = str(err.get("Code", ""))
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if code == "NoSuchBucket":
            return NoSuchBucketError(f"{uri}: no such bucket")
        if code in ("NoSuchKey", "404", "NotFound") or status == 404:
            return NotFoundError(f"{uri}: no such key")
        if code in ("AccessDenied", "403", "Forbidden", "InvalidAccessKeyId", "SignatureDoesNotMatch") or status == 403:
            return AccessDeniedError(f"{uri}: access denied ({code or status})")
        return StorageError(f"{uri}: S3 error {code or status}: {err.get('Message', '')}".rstrip(": "))
    if isinstance(exc, botocore.exceptions.EndpointConnectionError | botocore.exceptions.ConnectTimeoutError):
        return StorageError(f"{uri}: S3 endpoint unreachable ({_redact(S3Settings.from_env().endpoint_url)})")
    if isinstance(exc, botocore.exceptions.NoCredentialsError):
        return AccessDeniedError(f"{uri}: no AWS credentials found (set the standard AWS variables or a profile)")
    if isinstance(exc, botocore.exceptions.BotoCoreError):
        return StorageError(f"{uri}: {type(exc).__name__}: {exc}")
    if isinstance(exc, FileNotFoundError):
        return NotFoundError(f"{uri}: no such file")
    if isinstance(exc, PermissionError):
        return AccessDeniedError(f"{uri}: permission denied")
    if isinstance(exc, IsADirectoryError):
        return StorageError(f"{uri}: is a directory")
    if isinstance(exc, OSError):
        return StorageError(f"{uri}: {exc.strerror or exc}")
    return StorageError(f"{uri}: {type(exc).__name__}: {exc}")


class _translated:
    """Context manager: re-raise storage failures as StorageError naming the URI."""

    def __init__(self, uri: str):
        self.uri = uri

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc is None or not isinstance(exc, Exception) or isinstance(exc, StorageError):
            return False
        raise _translate(self.uri, exc) from exc


# --------------------------------------------------------------------------------------------
# Bytes and files


def read_bytes(uri: str) -> bytes:
    with _translated(uri):
        if is_s3(uri):
            bucket, key = split_s3(uri)
            return s3_client().get_object(Bucket=bucket, Key=key)["Body"].read()
        return Path(local_path(uri)).read_bytes()


def read_text(uri: str) -> str:
    return read_bytes(uri).decode("utf-8")


def read_spec_text(uri: str, what: str, error: type[Exception]) -> str:
    """The text of a file a user named as `what` (e.g. "render spec"); `error` with a one-line
    message when it cannot be read or is not text."""
    try:
        return read_text(uri)
    except StorageError as e:
        raise error(f"{what} {e}") from None
    except UnicodeDecodeError:
        raise error(f"{uri}: not a text file (expected a YAML or JSON {what})") from None


def read_json(uri: str) -> Any:
    data = read_bytes(uri)
    try:
        return json.loads(data)
    except ValueError as e:
        raise StorageError(f"{uri}: not valid JSON ({e})") from None


def write_bytes(
    uri: str, data: bytes, content_type: str | None = None, metadata: Mapping[str, str] | None = None
) -> None:
    """Write one object. Local writes go through a temp file + rename: never half-written.

    metadata: S3 user metadata (`x-amz-meta-*`, read back by `stat`); local files keep none.
    """
    if len(data) >= MULTIPART_THRESHOLD:
        with open_write(uri, content_type, metadata) as f:
            f.write(data)
        return
    with _translated(uri):
        if is_s3(uri):
            bucket, key = split_s3(uri)
            args = S3Settings.from_env().put_args(content_type or content_type_for(uri), metadata)
            s3_client().put_object(Bucket=bucket, Key=key, Body=data, **args)
        else:
            _atomic_local_write(local_path(uri), data)


def write_text(uri: str, text: str, content_type: str | None = None) -> None:
    write_bytes(uri, text.encode("utf-8"), content_type)


def json_bytes(obj: Any) -> bytes:
    """What `write_json` stores."""
    return (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode()


def write_json(uri: str, obj: Any) -> None:
    write_bytes(uri, json_bytes(obj), "application/json")


def _atomic_local_write(path: str, data: bytes) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            _publish(f, tmp, path)
    except BaseException:
        _silent_unlink(tmp)
        raise


def _umask() -> int:
    """This process's umask, read without changing it (os.umask sets it: a race with other threads)."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1], 8) for line in f if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError):
        return 0o022


def _publish(f: IO[bytes], tmp: str, path: str) -> None:
    """Put the temp file `tmp` (open as `f`) in place at `path` so that it survives a power cut:
    its data on disk first (fsync), the mode a plain open() would give (0666 less the umask;
    mkstemp makes 0600), then the rename, then the folder's entry on disk. After a crash `path` is
    the whole new file or what was there before, never a name for a file of zero length."""
    f.flush()
    os.fsync(f.fileno())
    os.fchmod(f.fileno(), 0o666 & ~_umask())
    os.replace(tmp, path)
    _fsync_dir(os.path.dirname(path))


def _fsync_dir(folder: str) -> None:
    fd = os.open(folder or ".", os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _silent_unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def upload_file(
    path: str | os.PathLike, uri: str, content_type: str | None = None, metadata: Mapping[str, str] | None = None
) -> None:
    """Copy a local file to a URI, streaming (multipart for large files on S3)."""
    with _translated(os.fspath(path)):
        src = open(path, "rb")  # noqa: SIM115 - closed by the with below
    with src, open_write(uri, content_type, metadata) as dst:
        shutil.copyfileobj(src, dst, PART_SIZE)


def download_file(uri: str, path: str | os.PathLike) -> None:
    """Copy a URI to a local file, streaming."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open_read(uri) as src, open(path, "wb") as dst:
        shutil.copyfileobj(src, dst, PART_SIZE)


def open_read(uri: str) -> IO[bytes]:
    """A binary stream of an object's bytes (S3: streamed from the GET; local: the file)."""
    with _translated(uri):
        if is_s3(uri):
            bucket, key = split_s3(uri)
            return _ReadStream(uri, s3_client().get_object(Bucket=bucket, Key=key)["Body"])
        return open(local_path(uri), "rb")


class _ReadStream(io.RawIOBase):
    def __init__(self, uri: str, body):
        self.uri, self.body = uri, body

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        with _translated(self.uri):
            data = self.body.read(len(b))
        b[: len(data)] = data
        return len(data)

    def close(self) -> None:
        self.body.close()
        super().close()


def open_write(uri: str, content_type: str | None = None, metadata: Mapping[str, str] | None = None) -> IO[bytes]:
    """A binary writer for one object; the object appears only when the writer closes cleanly.

    On S3, data goes up as a multipart upload once it passes MULTIPART_THRESHOLD (bounded memory
    for any size); an exception inside the `with` block aborts the upload, so no parts are left
    behind to bill. Locally, data goes to a temp file that is renamed into place on success.
    """
    normalize(uri)
    if is_s3(uri):
        return _S3Writer(uri, content_type or content_type_for(uri), metadata)
    return _LocalWriter(local_path(uri))


class _LocalWriter(io.RawIOBase):
    def __init__(self, path: str):
        self.path = path
        with _translated(path):
            os.makedirs(os.path.dirname(path), exist_ok=True)
            fd, self.tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-")
        self.f = os.fdopen(fd, "wb")

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:
        return self.f.write(b)

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()
        else:
            self.f.close()
            _silent_unlink(self.tmp)
            super().close()
        return False

    def close(self) -> None:
        if self.closed:
            return
        try:
            _publish(self.f, self.tmp, self.path)
        except BaseException:
            _silent_unlink(self.tmp)
            raise
        finally:
            self.f.close()
            super().close()


class _S3Writer(io.RawIOBase):
    def __init__(self, uri: str, content_type: str, metadata: Mapping[str, str] | None = None):
        self.uri = uri
        self.bucket, self.key = split_s3(uri)
        self.args = S3Settings.from_env().put_args(content_type, metadata)
        self.buffer = bytearray()
        self.upload_id: str | None = None
        self.parts: list[dict] = []

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:
        self.buffer += b
        if len(self.buffer) >= MULTIPART_THRESHOLD:
            while len(self.buffer) >= PART_SIZE:
                self._upload_part(bytes(self.buffer[:PART_SIZE]))
                del self.buffer[:PART_SIZE]
        return len(b)

    def _upload_part(self, data: bytes) -> None:
        client = s3_client()
        with _translated(self.uri):
            if self.upload_id is None:
                self.upload_id = client.create_multipart_upload(Bucket=self.bucket, Key=self.key, **self.args)["UploadId"]
            number = len(self.parts) + 1
            etag = client.upload_part(
                Bucket=self.bucket, Key=self.key, UploadId=self.upload_id, PartNumber=number, Body=data
            )["ETag"]
        self.parts.append({"PartNumber": number, "ETag": etag})

    def abort(self) -> None:
        if self.upload_id is not None:
            try:
                s3_client().abort_multipart_upload(Bucket=self.bucket, Key=self.key, UploadId=self.upload_id)
            finally:
                self.upload_id = None

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()
        else:
            self.abort()
            super().close()
        return False

    def close(self) -> None:
        if self.closed:
            return
        client = s3_client()
        try:
            with _translated(self.uri):
                if self.upload_id is None:
                    client.put_object(Bucket=self.bucket, Key=self.key, Body=bytes(self.buffer), **self.args)
                else:
                    if self.buffer:
                        self._upload_part(bytes(self.buffer))
                    client.complete_multipart_upload(
                        Bucket=self.bucket,
                        Key=self.key,
                        UploadId=self.upload_id,
                        MultipartUpload={"Parts": self.parts},
                    )
                    self.upload_id = None
        except BaseException:
            self.abort()
            raise
        finally:
            self.buffer = bytearray()
            super().close()


# --------------------------------------------------------------------------------------------
# Listing, existence, deletion, copying


def exists(uri: str) -> bool:
    """True when an object (or, locally, a file or directory) is at the URI."""
    if is_s3(uri):
        bucket, key = split_s3(uri)
        try:
            s3_client().head_object(Bucket=bucket, Key=key)
            return True
        except Exception as e:  # noqa: BLE001 - translated below
            err = _translate(uri, e)
            if isinstance(err, NotFoundError) and not isinstance(err, NoSuchBucketError):
                return False
            raise err from e
    return os.path.exists(local_path(uri))


def list_prefix(uri: str, recursive: bool = True) -> list[str]:
    """The URIs of all objects under a folder-like prefix, sorted. Missing prefix -> []."""
    if is_s3(uri):
        bucket, key = split_s3(uri)
        prefix = key.rstrip("/") + "/" if key else ""
        out = []
        with _translated(uri):
            paginator = s3_client().get_paginator("list_objects_v2")
            kwargs = {} if recursive else {"Delimiter": "/"}
            for page in paginator.paginate(Bucket=bucket, Prefix=prefix, **kwargs):
                # Keys ending in "/" are folder placeholders (pyarrow and Ray write them), not objects.
                out += [f"s3://{bucket}/{o['Key']}" for o in page.get("Contents", []) if not o["Key"].endswith("/")]
        return sorted(out)
    root = local_path(uri)
    if not os.path.isdir(root):
        return []
    if not recursive:
        return sorted(os.path.join(root, n) for n in os.listdir(root) if os.path.isfile(os.path.join(root, n)))
    return sorted(os.path.join(d, n) for d, _, names in os.walk(root) for n in names)


@dataclass(frozen=True)
class ObjectInfo:
    """What `stat` knows of one object. Local files: etag None, metadata empty."""

    uri: str
    bytes: int
    etag: str | None
    last_modified: float  # seconds since the epoch
    metadata: dict[str, str]


def stat(uri: str) -> ObjectInfo | None:
    """Size, ETag, modification time and user metadata of one object; None when it is absent."""
    if is_s3(uri):
        bucket, key = split_s3(uri)
        try:
            head = s3_client().head_object(Bucket=bucket, Key=key)
        except Exception as e:  # noqa: BLE001 - translated below
            err = _translate(uri, e)
            if isinstance(err, NotFoundError) and not isinstance(err, NoSuchBucketError):
                return None
            raise err from e
        return ObjectInfo(uri, int(head["ContentLength"]), head.get("ETag"), head["LastModified"].timestamp(),
                          dict(head.get("Metadata") or {}))
    path = local_path(uri)
    with _translated(uri):
        try:
            st = os.stat(path)
        except FileNotFoundError:
            return None
    if not os.path.isfile(path):
        return None
    return ObjectInfo(path, st.st_size, None, st.st_mtime, {})


def list_info(uri: str) -> list[ObjectInfo]:
    """What `stat` knows (but user metadata) of every object directly under a folder-like prefix,
    from one listing (no request per object), sorted by URI. Missing prefix -> []."""
    if is_s3(uri):
        bucket, key = split_s3(uri)
        prefix = key.rstrip("/") + "/" if key else ""
        out = []
        with _translated(uri):
            for page in s3_client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix,
                                                                             Delimiter="/"):
                out += [ObjectInfo(f"s3://{bucket}/{o['Key']}", int(o["Size"]), o.get("ETag"),
                                   o["LastModified"].timestamp(), {})
                        for o in page.get("Contents", []) if not o["Key"].endswith("/")]
        return sorted(out, key=lambda o: o.uri)
    return [info for info in (stat(u) for u in list_prefix(uri, recursive=False)) if info is not None]


def size(uri: str) -> int:
    with _translated(uri):
        if is_s3(uri):
            bucket, key = split_s3(uri)
            return int(s3_client().head_object(Bucket=bucket, Key=key)["ContentLength"])
        return os.path.getsize(local_path(uri))


def abort_uploads(uris: Iterable[str]) -> int:
    """Abort the unfinished multipart uploads to these S3 objects (what a killed writer leaves: a
    process killed mid-upload cannot abort its own); the number aborted. Local URIs have none."""
    by_bucket: dict[str, set[str]] = {}
    for uri in uris:
        if is_s3(uri):
            bucket, key = split_s3(uri)
            by_bucket.setdefault(bucket, set()).add(key)
    aborted = 0
    for bucket, keys in by_bucket.items():
        prefix = os.path.commonprefix(sorted(keys))
        with _translated(f"s3://{bucket}/{prefix}"):
            pages = s3_client().get_paginator("list_multipart_uploads").paginate(Bucket=bucket, Prefix=prefix)
            for upload in (u for page in pages for u in page.get("Uploads", []) if u["Key"] in keys):
                s3_client().abort_multipart_upload(Bucket=bucket, Key=upload["Key"], UploadId=upload["UploadId"])
                aborted += 1
    return aborted


def delete(uri: str) -> None:
    """Delete one object; a missing object is not an error."""
    with _translated(uri):
        if is_s3(uri):
            bucket, key = split_s3(uri)
            s3_client().delete_object(Bucket=bucket, Key=key)
        else:
            _silent_unlink(local_path(uri))


def delete_prefix(uri: str) -> int:
    """Delete everything under a folder-like prefix; returns the number of objects deleted."""
    uris = list_prefix(uri)
    if is_s3(uri):
        bucket, _ = split_s3(uri)
        with _translated(uri):
            for i in range(0, len(uris), 1000):
                keys = [{"Key": split_s3(u)[1]} for u in uris[i : i + 1000]]
                s3_client().delete_objects(Bucket=bucket, Delete={"Objects": keys, "Quiet": True})
    else:
        shutil.rmtree(local_path(uri), ignore_errors=True)
    return len(uris)


def copy(src: str, dst: str, content_type: str | None = None) -> None:
    """Copy one object; S3 to S3 is server-side (multipart for large objects)."""
    if is_s3(src) and is_s3(dst):
        sb, sk = split_s3(src)
        db, dk = split_s3(dst)
        args = S3Settings.from_env().put_args(content_type or content_type_for(dst))
        with _translated(f"{src} -> {dst}"):
            s3_client().copy({"Bucket": sb, "Key": sk}, db, dk, ExtraArgs={**args, "MetadataDirective": "REPLACE"})
        return
    with open_read(src) as f, open_write(dst, content_type) as g:
        shutil.copyfileobj(f, g, PART_SIZE)


def presign(uri: str, expires_s: int = 3600) -> str:
    """A URL a browser can GET: presigned for S3 (valid `expires_s` seconds), file:// locally."""
    if is_s3(uri):
        bucket, key = split_s3(uri)
        with _translated(uri):
            return s3_client().generate_presigned_url(
                "get_object", Params={"Bucket": bucket, "Key": key}, ExpiresIn=int(expires_s)
            )
    return Path(local_path(uri)).as_uri()


# --------------------------------------------------------------------------------------------
# Atomic publish of multi-object outputs


def publish(
    prefix: str,
    objects: Mapping[str, bytes | os.PathLike | str],
    marker: str,
    manifest: Mapping[str, Any],
    max_workers: int = 8,
) -> str:
    """Write `objects` (relative name -> bytes or local file path) under `prefix`, then the marker.

    The marker (`prefix/marker`, a JSON manifest) is written last, after every object is
    durable; readers that go through `read_marker` see the output only once it exists.
    Returns the marker's URI.
    """
    from concurrent.futures import ThreadPoolExecutor

    def put(item: tuple[str, bytes | os.PathLike | str]) -> None:
        name, data = item
        if isinstance(data, bytes | bytearray):
            write_bytes(join(prefix, name), bytes(data))
        else:
            upload_file(data, join(prefix, name))

    with ThreadPoolExecutor(max_workers=max_workers) as pool:
        list(pool.map(put, objects.items()))
    marker_uri = join(prefix, marker)
    write_json(marker_uri, dict(manifest))
    return marker_uri


def read_marker(prefix: str, marker: str) -> dict | None:
    """The committed manifest of an output, or None when the output is absent or uncommitted."""
    uri = join(prefix, marker)
    try:
        return read_json(uri)
    except NotFoundError:
        return None


def iter_chunks(uri: str, chunk_size: int = PART_SIZE) -> Iterator[bytes]:
    """An object's bytes in chunks (bounded memory)."""
    with open_read(uri) as f:
        while chunk := f.read(chunk_size):
            yield chunk

