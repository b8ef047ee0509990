"""teal.io (atomic writes) and teal.dtypes (dtype names)."""
from __future__ import annotations

import io
import json
import os
import stat
from pathlib import Path

import pytest
import torch

from teal.dtypes import DTYPES, dtype_name, parse_dtype
from teal.io import (WriteError, atomic_copy_stream, atomic_torch_save, atomic_write,
                     atomic_write_bytes, atomic_write_json, atomic_write_text, check_free_space)


def _default_mode() -> int:
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask


def _half_written(tmp):
    """A writer that puts something on disk, then fails."""
    tmp.write_bytes(b"partial")
    raise RuntimeError("disk on fire")


# ----------------------------------------------------------------------------- atomic writes

def test_failing_write_leaves_neither_target_nor_temp(tmp_path):
    target = tmp_path / "out.bin"
    with pytest.raises(WriteError, match=f"cannot write {target}: RuntimeError: disk on fire"):
        atomic_write(target, _half_written)
    assert list(tmp_path.iterdir()) == []


def test_interrupted_write_leaves_nothing(tmp_path):
    def interrupted(tmp):
        tmp.write_bytes(b"partial")
        raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        atomic_write(tmp_path / "out.bin", interrupted)
    assert list(tmp_path.iterdir()) == []


def test_existing_target_replaced_only_on_success(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("old")
    with pytest.raises(WriteError):
        atomic_write(target, _half_written)
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]
    assert atomic_write_text(target, "new") == target
    assert target.read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]


def test_temp_file_is_in_the_destination_folder(tmp_path):
    seen = []
    atomic_write(tmp_path / "out.bin", lambda tmp: seen.append(tmp) or tmp.write_bytes(b"x"))
    assert seen[0].parent == tmp_path and seen[0].name != "out.bin"
    assert not seen[0].exists()


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_mode_is_what_open_gives(tmp_path, umask):
    """Even when the writer creates its file 0600 (as safetensors does)."""
    def private_writer(tmp):
        tmp.unlink()
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT, 0o600)
        os.write(fd, b"data")
        os.close(fd)

    old = os.umask(umask)
    try:
        atomic_write(tmp_path / "a", private_writer)
        with open(tmp_path / "plain", "w"):
            pass
    finally:
        os.umask(old)
    want = stat.S_IMODE((tmp_path / "plain").stat().st_mode)
    assert want == 0o666 & ~umask
    assert stat.S_IMODE((tmp_path / "a").stat().st_mode) == want
    assert (tmp_path / "a").read_bytes() == b"data"


def test_mode_of_safetensors_write(tmp_path):
    from safetensors.torch import load_file, save_file
    path = atomic_write(tmp_path / "t.safetensors",
                        lambda tmp: save_file({"a": torch.arange(3.0)}, str(tmp)))
    assert stat.S_IMODE(path.stat().st_mode) == _default_mode()
    assert torch.equal(load_file(str(path))["a"], torch.arange(3.0))


def test_missing_folder(tmp_path):
    with pytest.raises(WriteError, match="cannot write .*f.bin: No such file or directory"):
        atomic_write_bytes(tmp_path / "no" / "such" / "f.bin", b"x")
    assert not (tmp_path / "no").exists()
    path = atomic_write_bytes(tmp_path / "no" / "such" / "f.bin", b"x", make_parents=True)
    assert path.read_bytes() == b"x"


def test_helpers_write_their_formats(tmp_path):
    atomic_write_bytes(tmp_path / "b", bytearray(b"\x00\xff"))
    assert (tmp_path / "b").read_bytes() == b"\x00\xff"
    with pytest.raises(TypeError, match="atomic_write_text"):
        atomic_write_bytes(tmp_path / "s", "text")
    atomic_write_text(tmp_path / "t", "héllo")
    assert (tmp_path / "t").read_bytes() == "héllo".encode("utf-8")
    atomic_write_json(tmp_path / "j.json", {"a": [1, 2]})
    assert (tmp_path / "j.json").read_text() == json.dumps({"a": [1, 2]}, indent=1)
    atomic_write_json(tmp_path / "j2.json", {"a": 1}, indent=2)
    assert (tmp_path / "j2.json").read_text() == '{\n  "a": 1\n}'
    atomic_torch_save({"w": torch.ones(2)}, tmp_path / "m.pth")
    assert torch.equal(torch.load(tmp_path / "m.pth", weights_only=True)["w"], torch.ones(2))
    atomic_copy_stream(io.BytesIO(b"z" * 10_000), tmp_path / "c")
    assert (tmp_path / "c").read_bytes() == b"z" * 10_000
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b", "c", "j.json", "j2.json",
                                                          "m.pth", "t"]


def test_torch_save_is_reproducible(tmp_path):
    """The temp file's random name must not end up inside the archive."""
    obj = {"w": torch.arange(6.0).reshape(2, 3), "meta": {"name": "x"}}
    atomic_torch_save(obj, tmp_path / "a.pth")
    atomic_torch_save(obj, tmp_path / "b.pth")
    assert (tmp_path / "a.pth").read_bytes() == (tmp_path / "b.pth").read_bytes()


def test_unserialisable_json_writes_nothing(tmp_path):
    (tmp_path / "j.json").write_text("{}")
    with pytest.raises(TypeError):
        atomic_write_json(tmp_path / "j.json", {"a": object()})
    assert (tmp_path / "j.json").read_text() == "{}"
    assert [p.name for p in tmp_path.iterdir()] == ["j.json"]


# ----------------------------------------------------------------------------- failures (issue 14 item 10)

def _one_line(e) -> str:
    msg = str(e.value)
    assert "\n" not in msg, msg
    return msg


def test_library_errors_become_one_line_naming_path_and_cause(tmp_path, monkeypatch):
    """torch's and safetensors' own error types (what a full disk gives) and a directory in
    the way: one WriteError line with the destination and the cause, nothing left behind."""
    import safetensors.torch
    from safetensors import SafetensorError

    def torch_full(obj, f, *a, **kw):
        f.write(b"PK partial")
        raise RuntimeError("[enforce fail at inline_container.cc:783] . PytorchStreamWriter "
                           "failed writing file data/0: file write failed")
    monkeypatch.setattr(torch, "save", torch_full)
    with pytest.raises(WriteError) as e:
        atomic_torch_save({"w": torch.ones(2)}, tmp_path / "m.pth")
    msg = _one_line(e)
    assert msg.startswith(f"cannot write {tmp_path / 'm.pth'}: ") and "file write failed" in msg
    assert "disk full?" in msg

    def st_full(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"x")
        raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: '
                              'StorageFull, message: "No space left on device" })')
    monkeypatch.setattr(safetensors.torch, "save_file", st_full)
    with pytest.raises(WriteError) as e:
        atomic_write(tmp_path / "t.safetensors",
                     lambda tmp: safetensors.torch.save_file({}, str(tmp)))
    msg = _one_line(e)
    assert "t.safetensors" in msg and "SafetensorError" in msg and "No space left" in msg

    (tmp_path / "d.json").mkdir()
    with pytest.raises(WriteError) as e:
        atomic_write_json(tmp_path / "d.json", {"a": 1})
    assert "directory is in the way" in _one_line(e)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.json"]


def test_enospc_is_named(tmp_path, monkeypatch):
    import errno

    def full(tmp):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    with pytest.raises(WriteError, match=r"cannot write .*out: No space left on device$"):
        atomic_write(tmp_path / "out", full)
    assert list(tmp_path.iterdir()) == []


def test_free_space_is_checked_before_the_work(tmp_path):
    check_free_space(tmp_path / "small.bin", 1)
    with pytest.raises(WriteError, match="needs about .* MB but only .* MB are free"):
        check_free_space(tmp_path / "sub" / "huge.bin", 1 << 62)


def _dead_pid() -> int:
    import subprocess
    import sys
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_stale_temps_of_dead_runs_are_removed(tmp_path):
    import subprocess
    import sys
    dead = tmp_path / f".out.bin.{_dead_pid()}-deadbeef.tmp"
    dead.write_bytes(b"left by a killed run")
    live_proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        live = tmp_path / f".out.bin.{live_proc.pid}-cafe0001.tmp"
        live.write_bytes(b"another writer, still running")
        other = tmp_path / f".other.bin.{_dead_pid()}-00aa.tmp"  # another destination's
        other.write_bytes(b"x")
        atomic_write_bytes(tmp_path / "out.bin", b"new")
        assert not dead.exists() and live.exists() and other.exists()
        assert (tmp_path / "out.bin").read_bytes() == b"new"
    finally:
        live_proc.kill()
        live_proc.wait()


def test_stale_temps_of_the_old_naming_schemes_are_removed(tmp_path):
    """`<name>.tmp` (the writers before teal.io) and `.<name>.<8 hex>.tmp` (teal.io before the
    pid): removed for the same destination once untouched for OLD_TEMP_MIN_AGE_S; a fresh
    one, other names and a live process's new-style temp are kept."""
    import subprocess
    import sys
    import time
    from teal.io import OLD_TEMP_MIN_AGE_S, remove_stale_temps
    old = time.time() - OLD_TEMP_MIN_AGE_S - 60
    stale = [tmp_path / "out.bin.tmp", tmp_path / ".out.bin.0badc0de.tmp"]
    kept = [tmp_path / "out.bin.tmp.bak", tmp_path / "xout.bin.tmp", tmp_path / "out.bin2.tmp",
            tmp_path / ".out.bin.0badc0d.tmp", tmp_path / ".out.bin.0BADC0DE.tmp",
            tmp_path / "other.bin.tmp", tmp_path / ".other.bin.0badc0de.tmp",
            tmp_path / "notes.txt"]
    for f in stale + kept:
        f.write_bytes(b"x")
        os.utime(f, (old, old))
    again = tmp_path / "out.bin.tmp"  # left once more by an old version, long ago
    (tmp_path / "sub").mkdir()
    fresh_old_writer = tmp_path / "sub" / "out.bin.tmp"
    fresh_old_writer.write_bytes(b"an old version still writing")
    (tmp_path / ".out.bin.0badc0de.tmp.d").mkdir()  # not a regular file: never removed
    live_proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        live = tmp_path / f".out.bin.{live_proc.pid}-cafe0001.tmp"
        live.write_bytes(b"another writer, still running")
        os.utime(live, (old, old))
        assert sorted(remove_stale_temps(tmp_path / "out.bin")) == sorted(stale)
        assert not any(f.exists() for f in stale)
        assert all(f.exists() for f in kept) and live.exists()
        assert (tmp_path / ".out.bin.0badc0de.tmp.d").is_dir()
        atomic_write_bytes(tmp_path / "sub" / "out.bin", b"new")  # the writer calls it
        assert fresh_old_writer.exists()
        assert remove_stale_temps(tmp_path / "sub" / "out.bin", old_min_age_s=0) == \
            [fresh_old_writer]
        assert sorted(p.name for p in (tmp_path / "sub").iterdir()) == ["out.bin"]
        again.write_bytes(b"y")
        os.utime(again, (old, old))
        atomic_write_bytes(tmp_path / "out.bin", b"new")  # the write removes it
        assert not again.exists() and live.exists() and (tmp_path / "out.bin").read_bytes() == b"new"
    finally:
        live_proc.kill()
        live_proc.wait()


def test_temp_names_are_unique_per_writer(tmp_path):
    names = []
    for _ in range(2):
        atomic_write(tmp_path / "o", lambda tmp: names.append(tmp.name) or tmp.write_bytes(b"1"))
    assert names[0] != names[1] and all(n.startswith(f".o.{os.getpid()}-") for n in names)


def test_sigterm_during_a_write_leaves_no_temp(tmp_path):
    import signal
    import subprocess
    import sys
    import time
    root = Path(__file__).resolve().parents[1]
    code = ("import sys, time; sys.path.insert(0, %r)\n"
            "from teal.io import atomic_write\n"
            "def slow(tmp):\n"
            "    tmp.write_bytes(b'partial'); print('writing', flush=True); time.sleep(60)\n"
            "atomic_write(%r, slow)\n" % (str(root), str(tmp_path / "out.bin")))
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "writing"
    assert any(tmp_path.iterdir())  # the temp file exists while writing
    p.send_signal(signal.SIGTERM)
    assert p.wait(timeout=30) == -signal.SIGTERM
    time.sleep(0.1)
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- dtypes

def test_parse_dtype():
    assert parse_dtype("bfloat16") is torch.bfloat16
    assert {n: parse_dtype(n) for n in DTYPES} == DTYPES
    assert parse_dtype("float16", allowed=["float16"]) is torch.float16


def test_parse_dtype_error_names_the_choices():
    with pytest.raises(ValueError) as e:
        parse_dtype("fp8")
    msg = str(e.value)
    assert "\n" not in msg and "'fp8'" in msg
    assert all(name in msg for name in DTYPES)
    with pytest.raises(ValueError, match=r"'float32'; choose one of bfloat16$"):
        parse_dtype("float32", allowed=["bfloat16"])
    with pytest.raises(ValueError, match="not in teal.dtypes.DTYPES"):
        parse_dtype("auto", allowed=["auto", "float32"])


def test_dtype_name():
    assert [dtype_name(d) for d in DTYPES.values()] == list(DTYPES)
    assert dtype_name(torch.int8) == "int8"
    with pytest.raises(TypeError):
        dtype_name("float32")


def test_every_artefact_writer_reports_one_line(tmp_path):
    """Checkpoint (dense and quantized), thresholds and greedy file writers: a directory in
    the way of the destination is a one-line WriteError naming it."""
    from teal.checkpoint import save_checkpoint
    from teal.greedy import FORMAT, GreedyAllocation
    from teal.thresholds import Calibration
    writers = {
        "model.pth": lambda p: save_checkpoint(p, {}, {"w": torch.ones(1)}),
        "model_int8.pth": lambda p: save_checkpoint(p, {}, {}, quantization={"mode": "int8"}),
        "thresholds.safetensors": lambda p: Calibration.empty({}, 1).save(p),
        "greedy.json": lambda p: GreedyAllocation(dict(format=FORMAT)).save(p),
    }
    for name, write in writers.items():
        (tmp_path / name).mkdir()
        with pytest.raises(WriteError) as e:
            write(tmp_path / name)
        assert _one_line(e).startswith(f"cannot write {tmp_path / name}: "), name
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(writers)
