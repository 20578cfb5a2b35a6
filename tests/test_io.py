"""sparsify.io: a write that fails midway leaves the previous file intact and no temporary files behind."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import textwrap

import pytest

from sparsify.io import atomic_paths, write_bytes_atomically, write_text_atomically


def test_write_replaces_the_whole_file(tmp_path):
    path = tmp_path / "notes.txt"
    write_text_atomically(path, "first version, quite long\n")
    write_text_atomically(path, "second\n")
    assert path.read_text() == "second\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_an_exception_while_writing_keeps_the_old_file(tmp_path):
    path = tmp_path / "model.bin"
    write_bytes_atomically(path, b"good")
    with pytest.raises(RuntimeError, match="writer failed"):
        with atomic_paths(path) as (temporary,):
            temporary.write_bytes(b"half a fi")
            raise RuntimeError("writer failed")
    assert path.read_bytes() == b"good"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.bin"]


def test_a_writer_that_writes_nothing_is_an_error(tmp_path):
    path = tmp_path / "empty.bin"
    with pytest.raises(FileNotFoundError, match="nothing was written"):
        with atomic_paths(path):
            pass
    assert not path.exists() and not list(tmp_path.iterdir())


def test_files_written_together_keep_their_names_side_by_side(tmp_path):
    model, data = tmp_path / "m.onnx", tmp_path / "m.onnx.data"
    with atomic_paths(data, model) as (data_temporary, model_temporary):
        assert data_temporary.parent == model_temporary.parent and data_temporary.name == "m.onnx.data"
        data_temporary.write_bytes(b"weights")
        model_temporary.write_bytes(b"graph")
    assert model.read_bytes() == b"graph" and data.read_bytes() == b"weights"
    with pytest.raises(ValueError, match="share a folder"):
        with atomic_paths(model, tmp_path / "other" / "x"):
            pass


def test_a_folder_is_refused(tmp_path):
    with pytest.raises(IsADirectoryError):
        write_text_atomically(tmp_path, "x")


def test_permissions_are_kept_when_replacing_and_follow_the_umask_when_new(tmp_path):
    path = tmp_path / "private.json"
    path.write_text("{}")
    os.chmod(path, 0o600)
    write_text_atomically(path, "{\"a\": 1}")
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    fresh = tmp_path / "fresh.json"
    write_text_atomically(fresh, "{}")
    plain = tmp_path / "plain.json"
    plain.write_text("{}")  # what open(path, "w") gives under this process's umask
    assert stat.S_IMODE(os.stat(fresh).st_mode) == stat.S_IMODE(os.stat(plain).st_mode)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_FSIZE semantics checked on Linux")
def test_a_file_size_limit_midway_keeps_the_previous_strategy(tmp_path):
    """The issue's reproduction: `ulimit -f 8` while saving over a good strategy."""
    script = textwrap.dedent(f"""
        import resource
        from sparsify import AttentionSite, Strategy, patterns
        sites = [AttentionSite(f"layers.{{i}}.attn", i, num_heads=8, num_kv_heads=8, head_dim=64, q_len=4096,
                               k_len=4096) for i in range(64)]
        Strategy.uniform(sites[:1], patterns.sliding_window(64)).save({str(tmp_path / "precious.json")!r})
        big = Strategy.uniform(sites, patterns.sliding_window(128), metadata={{"notes": "x" * 20000}})
        resource.setrlimit(resource.RLIMIT_FSIZE, (8192, 8192))
        try:
            big.save({str(tmp_path / "precious.json")!r})
        except OSError as error:
            print("refused:", error.strerror)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "refused: File too large" in done.stdout
    from sparsify import Strategy

    kept = Strategy.load(tmp_path / "precious.json")  # the previous good strategy, whole
    assert list(kept.sites) == ["layers.0.attn"] and str(kept.sites["layers.0.attn"].heads[0]) == "sliding_window(64)"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["precious.json"]
