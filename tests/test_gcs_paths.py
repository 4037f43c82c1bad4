"""tpustack.paths on local paths and on gs:// (a local emulator), orbax on gs://, and where the
emulator differs from Cloud Storage."""

import json
import os
import subprocess
import sys
import urllib.error
import urllib.request

import numpy as np
import pytest

from tpustack import paths
from tpustack.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(params=["local", "gs"])
def root(request, tmp_path):
    """The same tests on a local directory and on a fresh bucket."""
    return str(tmp_path) if request.param == "local" else request.getfixturevalue("gcs_bucket") + "/root"


def test_write_read_list_and_glob(root):
    data = paths.join(root, "data")
    paths.makedirs(paths.join(data, "sub"))
    paths.write_text(paths.join(data, "a.txt"), "héllo\r\nworld\n")
    paths.write_bytes(paths.join(data, "sub", "b.txt"), b"\xff\xfebytes")
    paths.write_text(paths.join(data, "c.json"), "{}")
    assert paths.isdir(data) and paths.isfile(paths.join(data, "a.txt"))
    assert not paths.isdir(paths.join(data, "a.txt")) and not paths.exists(paths.join(data, "nope"))
    assert paths.read_text(paths.join(data, "a.txt")) == "héllo\nworld\n"  # universal newlines, as open()
    assert paths.read_text(paths.join(data, "sub", "b.txt"), errors="replace") == "\ufffd\ufffdbytes"
    with pytest.raises(UnicodeDecodeError):
        paths.read_text(paths.join(data, "sub", "b.txt"))
    assert paths.glob(paths.join(data, "*.txt")) == [paths.join(data, "a.txt")]
    assert paths.glob(paths.join(data, "*", "*.txt")) == [paths.join(data, "sub", "b.txt")]
    assert paths.glob(paths.join(data, "**", "*.txt")) == [paths.join(data, "a.txt"), paths.join(data, "sub", "b.txt")]
    paths.write_text(paths.join(root, "data2.txt"), "")  # a sibling whose name starts like the directory
    found = paths.find(data)
    assert found == sorted(paths.join(data, n) for n in ("a.txt", "c.json", "sub/b.txt"))
    assert [paths.relative(f, data) for f in found] == ["a.txt", "c.json", "sub/b.txt"]
    assert paths.size(paths.join(data, "c.json")) == 2
    with paths.open(paths.join(data, "a.txt")) as f:
        assert [line for line in f] == ["héllo\n", "world\n"]
    with paths.local_copy(paths.join(data, "c.json")) as local:
        assert open(local).read() == "{}"
    assert str(paths.as_path(paths.join(root, "x"))) == paths.join(root, "x")


def test_read_ranges(root):
    blob = np.arange(1000, dtype=np.uint16).tobytes()
    f = paths.join(root, "t.bin")
    paths.write_bytes(f, blob)
    assert paths.read_range(f, 10, 6) == blob[10:16]
    assert paths.read_ranges(f, [0, 1998, 500], [4, 2, 0]) == [blob[:4], blob[1998:], b""]
    with pytest.raises(IndexError, match="past the end"):
        paths.read_range(f, 1990, 20)


def test_join_and_schemes():
    assert paths.join("gs://b", "run", "tb") == "gs://b/run/tb"
    assert paths.join("gs://b/run/", "ckpt") == "gs://b/run/ckpt"
    assert paths.join("./runs", "tiny") == "./runs/tiny"  # local strings stay as written
    assert paths.is_remote("gs://b/x") and not paths.is_remote("runs/x") and not paths.is_remote("/tmp/x")
    with pytest.raises(UserError, match="unsupported scheme 'gcs'"):
        paths.exists("gcs://b/x")


def test_orbax_save_restore_on_gs(gcs_bucket):
    """orbax writes arrays through tensorstore and metadata through epath: both reach the bucket."""
    import orbax.checkpoint as ocp

    tree = {"w": np.arange(24, dtype=np.float32).reshape(4, 6), "b": {"step": np.int32(7)}}
    target = paths.as_path(paths.join(gcs_bucket, "x"))
    ckptr = ocp.StandardCheckpointer()
    ckptr.save(target, tree)
    ckptr.wait_until_finished()
    assert paths.exists(paths.join(gcs_bucket, "x", "_CHECKPOINT_METADATA"))
    restored = ckptr.restore(target)
    np.testing.assert_array_equal(restored["w"], tree["w"])
    assert int(restored["b"]["step"]) == 7
    ckptr.close()
    # a subprocess (the CLI, another host) inherits the emulator's environment: gcsfs and tensorstore
    paths.write_text(paths.join(gcs_bucket, "note.txt"), "from the parent")
    child = (f"import orbax.checkpoint as ocp; from tpustack import paths; "
             f"print(paths.read_text({gcs_bucket + '/note.txt'!r})); "
             f"print(ocp.StandardCheckpointer().restore(paths.as_path({str(target)!r}))['w'].sum())")
    out = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split("\n")[:2] == ["from the parent", str(tree["w"].sum())]


def _request(url, method="GET", data=None, headers=None):
    req = urllib.request.Request(url, method=method, data=data, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def test_emulator_shortfalls(gcs_emulator, gcs_bucket):
    """What tests/gcs.py's docstring says the emulator gets wrong; a newer emulator that fixes
    one fails here, and the docstring's list of untested behaviour shrinks."""
    bucket = gcs_bucket[len("gs://"):]
    upload = f"{gcs_emulator}/upload/storage/v1/b/{bucket}/o?uploadType=media&name=obj"
    assert _request(upload, "POST", bytes(range(100)))[0] == 200
    media = f"{gcs_emulator}/storage/v1/b/{bucket}/o/obj?alt=media"
    assert _request(media, headers={"Range": "bytes=10-19"}) == (206, bytes(range(10, 20)))
    assert _request(media, headers={"Range": "bytes=95-"}) == (206, bytes(range(95, 100)))
    # tests/gcs.py adds the generation headers Cloud Storage sends (tensorstore needs them)
    with urllib.request.urlopen(media, timeout=10) as r:
        meta = json.loads(_request(f"{gcs_emulator}/storage/v1/b/{bucket}/o/obj")[1])
        assert r.headers["x-goog-generation"] == meta["generation"] and r.headers["x-goog-metageneration"] == "1"
    # Cloud Storage: 206 with the last 5 bytes; the emulator ignores a suffix range
    assert _request(media, headers={"Range": "bytes=-5"}) == (200, bytes(range(100)))
    # Cloud Storage: 412 Precondition Failed (the object exists); the emulator overwrites it
    assert _request(upload + "&ifGenerationMatch=0", "POST", b"new")[0] == 200
    assert _request(upload + "&ifGenerationMatch=12345", "POST", b"newer")[0] == 200
    assert paths.read_bytes(f"{gcs_bucket}/obj") == b"newer"


def test_another_hosts_writes_are_seen_after_a_listing(gcs_emulator, gcs_bucket):
    """gcsfs answers exists/info from a cached listing of the parent directory; another host's
    object written after that listing must still be found (tpustack.paths turns the cache off)."""
    run = paths.join(gcs_bucket, "run")
    paths.write_text(paths.join(run, "1", "done"), "")
    assert paths.glob(paths.join(run, "*")) == [paths.join(run, "1")] and paths.isdir(run)
    bucket = gcs_bucket[len("gs://"):]
    upload = f"{gcs_emulator}/upload/storage/v1/b/{bucket}/o?uploadType=media&name=run/2/done"
    assert _request(upload, "POST", b"x")[0] == 200  # not through this process's filesystem object
    assert paths.isfile(paths.join(run, "2", "done")) and paths.isdir(paths.join(run, "2"))
    assert paths.as_path(paths.join(run, "2", "done")).exists()  # orbax's view, through etils epath
