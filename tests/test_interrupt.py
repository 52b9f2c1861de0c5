"""A real Ctrl-C (SIGINT) during a merge leaves neither OUT nor a temporary directory behind."""

import signal
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from synthetic import LlamaShape, write_checkpoint, write_lora_adapter  # noqa: E402

EXIT_INTERRUPTED = 130


def test_sigint_during_write_leaves_nothing(tmp_path):
    # About 0.5 GB, so that the write phase lasts long enough to be interrupted.
    shape = LlamaShape(layers=2, hidden=2048, intermediate=8192)
    base, adapter, out = tmp_path / "base", tmp_path / "adapter", tmp_path / "out"
    write_checkpoint(base, shape, shard_bytes=10**8)
    write_lora_adapter(adapter, shape)
    base_files = {path.name: path.stat().st_mtime_ns for path in base.iterdir()}

    process = subprocess.Popen([sys.executable, "-m", "foldkit.cli", "merge", str(base), str(adapter), str(out)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob(".out.foldkit-*/model-00001-*")) and time.monotonic() < deadline:
        assert process.poll() is None, process.stderr.read()
        time.sleep(0.01)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)

    assert process.returncode == EXIT_INTERRUPTED, stderr
    assert stderr.strip().splitlines()[-1] == "Error: interrupted; no partial output was written and any existing OUT is unchanged"
    assert "Traceback" not in stderr
    assert not out.exists()
    assert list(tmp_path.glob(".out.foldkit-*")) == []
    assert {path.name: path.stat().st_mtime_ns for path in base.iterdir()} == base_files


def test_sigint_during_export_leaves_nothing(tmp_path):
    """Ctrl-C once the staging directory exists: while the model loads or traces, before the graph is saved."""
    from tiny_models import save_tiny_base

    base = save_tiny_base("llama", tmp_path / "base", 51).directory
    out = tmp_path / "out"
    process = subprocess.Popen([sys.executable, "-m", "foldkit.cli", "export", str(base), str(out)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob(".out.foldkit-*")) and time.monotonic() < deadline:
        assert process.poll() is None, process.stderr.read()
        time.sleep(0.01)
    time.sleep(0.5)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)

    assert process.returncode == EXIT_INTERRUPTED, stderr
    assert stderr.strip().splitlines()[-1].startswith("Error: interrupted")
    assert "Traceback" not in stderr
    assert not out.exists()
    assert list(tmp_path.glob(".out.foldkit-*")) == []
