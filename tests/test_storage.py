"""vidgen.storage against a local folder and moto's S3 server on 127.0.0.1 (same test code)."""

from __future__ import annotations

import os
import urllib.request

import pytest

from vidgen import storage
from vidgen.storage import AccessDeniedError, NotFoundError, StorageError


def test_bytes_text_json_round_trip(root):
    storage.write_bytes(storage.join(root, "a", "b.bin"), b"\x00\x01hello")
    storage.write_text(storage.join(root, "a", "c.txt"), "héllo ✓")
    storage.write_json(storage.join(root, "d.json"), {"x": [1, 2]})
    assert storage.read_bytes(storage.join(root, "a", "b.bin")) == b"\x00\x01hello"
    assert storage.read_text(storage.join(root, "a", "c.txt")) == "héllo ✓"
    assert storage.read_json(storage.join(root, "d.json")) == {"x": [1, 2]}
    assert storage.size(storage.join(root, "a", "b.bin")) == 7


def test_list_exists_delete_copy(root):
    names = ["x/1.txt", "x/2.txt", "x/sub/3.txt", "y.txt"]
    for n in names:
        storage.write_bytes(storage.join(root, *n.split("/")), n.encode())
    listed = storage.list_prefix(root)
    assert [u[len(root) + 1 :].replace(os.sep, "/") for u in listed] == sorted(names)
    assert len(storage.list_prefix(storage.join(root, "x"), recursive=False)) == 2
    assert storage.list_prefix(storage.join(root, "nothing-here")) == []
    assert storage.exists(storage.join(root, "y.txt"))
    assert not storage.exists(storage.join(root, "z.txt"))

    storage.copy(storage.join(root, "y.txt"), storage.join(root, "copy", "y.txt"))
    assert storage.read_bytes(storage.join(root, "copy", "y.txt")) == b"y.txt"
    storage.delete(storage.join(root, "y.txt"))
    storage.delete(storage.join(root, "y.txt"))  # deleting a missing object is fine
    assert not storage.exists(storage.join(root, "y.txt"))
    assert storage.delete_prefix(storage.join(root, "x")) == 3
    assert storage.list_prefix(storage.join(root, "x")) == []


def test_list_info_matches_stat_in_one_listing(root):
    for name, data in (("a.json", b"{}"), ("b.json", b'{"x": 1}'), ("sub/c.json", b"[]")):
        storage.write_bytes(storage.join(root, "items", name), data)
    listed = storage.list_info(storage.join(root, "items"))
    assert [storage.basename(o.uri) for o in listed] == ["a.json", "b.json"]  # this folder only
    for o in listed:
        st = storage.stat(storage.join(root, "items", storage.basename(o.uri)))
        assert (o.bytes, o.etag, round(o.last_modified)) == (st.bytes, st.etag, round(st.last_modified))
    assert storage.list_info(storage.join(root, "nothing-here")) == []


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_local_writes_are_synced_before_and_after_the_rename_and_honour_the_umask(tmp_path, monkeypatch, umask):
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", "folder" if os.path.isdir(f"/proc/self/fd/{fd}") else "file"))
        real_fsync(fd)

    def replace(src, dst):
        events.append(("rename", os.path.basename(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(storage.os, "fsync", fsync)
    monkeypatch.setattr(storage.os, "replace", replace)
    old = os.umask(umask)
    try:
        storage.write_bytes(str(tmp_path / "record.json"), b"{}")
        with storage.open_write(str(tmp_path / "video.mp4")) as f:
            f.write(b"x" * 1000)
    finally:
        os.umask(old)
    expected = [("fsync", "file"), ("rename", "record.json"), ("fsync", "folder"),
                ("fsync", "file"), ("rename", "video.mp4"), ("fsync", "folder")]
    assert events == expected  # a power cut never leaves a name for a file whose data is not on disk
    for name in ("record.json", "video.mp4"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o666 & ~umask


def test_streaming_multipart_upload_of_20mb(root, tmp_path):
    data = os.urandom(20 * 1024 * 1024 + 123)
    uri = storage.join(root, "big.bin")
    with storage.open_write(uri) as f:
        for i in range(0, len(data), 3_000_000):  # odd-sized writes, as an encoder would produce
            f.write(data[i : i + 3_000_000])
    assert storage.size(uri) == len(data)
    assert storage.read_bytes(uri) == data
    src = tmp_path / "src.bin"
    src.write_bytes(data)
    storage.upload_file(src, storage.join(root, "big2.bin"))
    storage.download_file(storage.join(root, "big2.bin"), tmp_path / "back.bin")
    assert (tmp_path / "back.bin").read_bytes() == data
    if storage.is_s3(root):
        bucket, key = storage.split_s3(uri)
        etag = storage.s3_client().head_object(Bucket=bucket, Key=key)["ETag"]
        parts = -(-len(data) // storage.PART_SIZE)  # 3 at the default sizes; more at the tests' (conftest)
        assert etag.strip('"').endswith(f"-{parts}"), etag  # it went up as multipart, in PART_SIZE parts


def test_failed_streaming_write_leaves_nothing(root):
    uri = storage.join(root, "partial.bin")
    with pytest.raises(RuntimeError):
        with storage.open_write(uri) as f:
            f.write(os.urandom(18 * 1024 * 1024))  # past the threshold: parts are uploaded
            raise RuntimeError("encoder crashed")
    assert not storage.exists(uri)
    if storage.is_s3(root):
        bucket, _ = storage.split_s3(root)
        uploads = storage.s3_client().list_multipart_uploads(Bucket=bucket).get("Uploads", [])
        assert [u for u in uploads if u["Key"].endswith("partial.bin")] == []  # aborted, not billed
    else:
        assert os.listdir(storage.local_path(root)) == []  # no temp file left behind


def test_atomic_publish_marker_last(root, tmp_path):
    out = storage.join(root, "out")
    assert storage.read_marker(out, "_manifest.json") is None
    big = tmp_path / "clip.mp4"
    big.write_bytes(b"\x00" * 1000)
    storage.publish(out, {"a.bin": b"a", "clips/clip.mp4": big}, "_manifest.json", {"n": 2})
    assert storage.read_marker(out, "_manifest.json") == {"n": 2}
    assert storage.read_bytes(storage.join(out, "a.bin")) == b"a"


def test_writer_dies_before_marker_reader_sees_nothing(root, tmp_path):
    """An output whose writer fails part-way never gets its marker, so readers see nothing."""
    out = storage.join(root, "crashed")
    objects = {"part-0": b"0", "part-1": str(tmp_path / "vanished.mp4")}  # the second cannot be read
    with pytest.raises(NotFoundError):
        storage.publish(out, objects, "_manifest.json", {"n": 2})
    assert storage.read_bytes(storage.join(out, "part-0")) == b"0"  # objects may be there...
    assert storage.read_marker(out, "_manifest.json") is None  # ...but the output is absent


def test_uploads_carry_content_type(s3_root):
    for name, expected in [
        ("v.mp4", "video/mp4"),
        ("v.webm", "video/webm"),
        ("p.jpg", "image/jpeg"),
        ("index.html", "text/html; charset=utf-8"),
        ("m.json", "application/json"),
    ]:
        uri = storage.join(s3_root, name)
        storage.write_bytes(uri, b"x")
        bucket, key = storage.split_s3(uri)
        assert storage.s3_client().head_object(Bucket=bucket, Key=key)["ContentType"] == expected


def test_server_side_encryption_setting(s3_root, monkeypatch):
    monkeypatch.setenv("VIDGEN_S3_SSE", "AES256")
    uri = storage.join(s3_root, "enc.bin")
    storage.write_bytes(uri, b"secret")
    with storage.open_write(storage.join(s3_root, "enc-big.bin")) as f:
        f.write(os.urandom(17 * 1024 * 1024))
    for key_uri in (uri, storage.join(s3_root, "enc-big.bin")):
        bucket, key = storage.split_s3(key_uri)
        assert storage.s3_client().head_object(Bucket=bucket, Key=key)["ServerSideEncryption"] == "AES256"
    monkeypatch.setenv("VIDGEN_S3_SSE", "rot13")
    with pytest.raises(StorageError, match="rot13"):
        storage.write_bytes(uri, b"x")


def test_presigned_get_url_downloads(s3_root):
    uri = storage.join(s3_root, "clip.mp4")
    storage.write_bytes(uri, b"fake video bytes")
    url = storage.presign(uri, expires_s=120)
    assert url.startswith("http://127.0.0.1:")
    assert "X-Amz-Expires=120" in url or "Expires=" in url
    with urllib.request.urlopen(url, timeout=10) as r:  # noqa: S310 - loopback moto server
        assert r.read() == b"fake video bytes"
        assert r.headers["Content-Type"] == "video/mp4"


def test_presign_local_is_file_url(tmp_path):
    p = tmp_path / "x.mp4"
    p.write_bytes(b"1")
    assert storage.presign(str(p)) == p.as_uri()


def test_errors_name_uri_and_cause(root, s3_bucket):
    missing = storage.join(root, "nope.bin")
    with pytest.raises(NotFoundError, match=r"nope\.bin.*no such"):
        storage.read_bytes(missing)
    with pytest.raises(NotFoundError):
        storage.size(missing)
    with pytest.raises(NotFoundError, match="no such bucket"):
        storage.read_bytes("s3://no-such-bucket-here/x")


@pytest.mark.parametrize(
    "uri,cause",
    [("s3://", "malformed"), ("s3:///key", "malformed"), ("s3://ab/key", "3 to 63"), ("gs://b/k", "unsupported")],
)
def test_malformed_uris(uri, cause):
    with pytest.raises(StorageError, match=cause):
        storage.read_bytes(uri)


def test_endpoint_unreachable(monkeypatch, s3_server):
    from conftest import free_port

    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    storage.reset_clients()
    try:
        with pytest.raises(StorageError, match=r"s3://bucket/k: S3 endpoint unreachable \(http://127\.0\.0\.1"):
            storage.read_bytes("s3://bucket/k")
    finally:
        monkeypatch.undo()
        storage.reset_clients()


def test_access_denied_never_prints_credentials(s3_root, monkeypatch):
    """moto enforces credentials when its no-auth allowance is 0: unknown keys are refused."""
    import moto.settings

    monkeypatch.setattr(moto.settings, "INITIAL_NO_AUTH_ACTION_COUNT", 0)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "sup3r-s3cret-value")
    storage.reset_clients()
    try:
        with pytest.raises(AccessDeniedError, match="access denied") as info:
            storage.read_bytes(storage.join(s3_root, "x"))
        assert "sup3r-s3cret-value" not in str(info.value)
        assert storage.join(s3_root, "x") in str(info.value)
    finally:
        monkeypatch.undo()
        storage.reset_clients()


def test_relative_paths_become_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert storage.normalize("data/ds") == str(tmp_path / "data" / "ds")
    assert storage.normalize(f"file://{tmp_path}/x") == str(tmp_path / "x")
    assert storage.normalize("s3://bucket/ds") == "s3://bucket/ds"


def test_pyarrow_filesystem_reads_what_boto3_wrote(root):
    uri = storage.join(root, "t.bin")
    storage.write_bytes(uri, b"arrow")
    fs, path = storage.pyarrow_filesystem(uri)
    with fs.open_input_stream(path) as f:
        assert f.read() == b"arrow"
