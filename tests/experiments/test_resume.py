"""A sweep killed mid-way and restarted finishes every cell exactly once (tiny random model)."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path


from experiments import results_log

ROOT = Path(__file__).resolve().parents[2]


def _start(args, env):
    return subprocess.Popen([sys.executable, "-m", *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)


def _cells(path):
    return [r for r in results_log.read_jsonl(path) if r.get("type") == "cell"]


def test_layer_sweep_killed_and_restarted_runs_each_cell_once(tmp_path):
    out = tmp_path / "layer.jsonl"
    env = {**os.environ, "JAXEDIT_JIT_CACHE": str(tmp_path / "jit"), "JAX_PLATFORMS": "cpu",
           "JAX_DISABLE_MOST_OPTIMIZATIONS": "1"}  # small programs: compiling dominates, so compile less
    args = ["experiments.layer_sweep", "--model=tiny-random", "--layers=0,1,2,3", "--methods=memit", "--n=2",
            f"--out={out}", f"--cache_dir={tmp_path / 'cache'}", "--v_steps=2"]
    first = args + ["--test_pause_after_cell=3"]
    proc = _start(first, env)
    deadline = time.time() + 180
    try:
        while time.time() < deadline and proc.poll() is None and not _cells(out):
            time.sleep(0.2)
        assert _cells(out), f"no record before the kill: {proc.communicate()[0].decode()[-3000:] if proc.poll() is not None else ''}"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    with open(out, "ab") as f:  # as if the kill had torn a write
        f.write(b'{"type": "cell", "key": {"sweep": "layer", "la')
    done_before = {r["key"]["layer"] for r in _cells(out)}
    assert done_before and len(done_before) < 4, "the first run finished before it could be killed"

    again = subprocess.run([sys.executable, "-m", *args], cwd=ROOT, env=env, capture_output=True, timeout=180)
    assert again.returncode == 0, again.stderr.decode()[-3000:]
    cells = _cells(out)
    assert sorted(r["key"]["layer"] for r in cells) == [0, 1, 2, 3]
    assert out.read_bytes().endswith(b"\n")
    for r in cells:
        assert r["aggregate"]["n_cases"] == 2 and len(r["cases"]) == 2 and r["key"]["method"] == "memit"
    # a third run has nothing left to do and writes nothing
    third = subprocess.run([sys.executable, "-m", *args], cwd=ROOT, env=env, capture_output=True, timeout=120)
    assert third.returncode == 0 and len(_cells(out)) == 4
    assert len(out.read_bytes().splitlines()) == 4


def test_a_second_sweep_on_the_same_file_is_refused_and_each_cell_written_once(tmp_path):
    out = tmp_path / "layer.jsonl"
    env = {**os.environ, "JAXEDIT_JIT_CACHE": str(tmp_path / "jit"), "JAX_PLATFORMS": "cpu",
           "JAX_DISABLE_MOST_OPTIMIZATIONS": "1"}  # small programs: compiling dominates, so compile less
    args = ["experiments.layer_sweep", "--model=tiny-random", "--layers=0,1,2", "--methods=memit", "--n=2",
            f"--out={out}", f"--cache_dir={tmp_path / 'cache'}", "--v_steps=2"]
    first = _start(args + ["--test_pause_after_cell=600"], env)  # holds the file until killed
    deadline = time.time() + 180
    try:
        while time.time() < deadline and first.poll() is None and not _cells(out):
            time.sleep(0.2)
        assert _cells(out), f"no record from the first run: {first.communicate()[0].decode()[-3000:] if first.poll() is not None else ''}"
        second = subprocess.run([sys.executable, "-m", *args], cwd=ROOT, env=env, capture_output=True, timeout=180)
        assert first.poll() is None, "the first run ended before the second one started"
        message = second.stderr.decode()
        assert second.returncode != 0, "a second sweep was let write to the same results file"
        assert str(out) in message and f"pid {first.pid}" in message, message[-3000:]
        assert len(_cells(out)) == 1
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)  # a crash: the lock must go with the process
        first.wait()
    third = subprocess.run([sys.executable, "-m", *args], cwd=ROOT, env=env, capture_output=True, timeout=180)
    assert third.returncode == 0, third.stderr.decode()[-3000:]
    assert sorted(r["key"]["layer"] for r in _cells(out)) == [0, 1, 2]
