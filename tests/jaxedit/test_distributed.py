"""Two processes on localhost (4 forced host devices each, CPU collectives over gloo) on one global
2x4 mesh: a MEMIT edit equals the one-process edit (C0, Delta W, NLLs); a sweep writes every cell
once, also when one process dies mid-way (the other stops with an error naming it) and the sweep is
run again."""
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from experiments import results_log, world
from jaxedit import distributed
from jaxedit.data import counterfact
from jaxedit.editing import editor
from jaxedit.eval import metrics

ROOT = Path(__file__).resolve().parents[2]
FOUR = {"XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu",
        "JAX_DISABLE_MOST_OPTIMIZATIONS": "1"}  # small programs: compiling dominates, so compile less


def _port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _pair(args_of, timeout=600, env_extra=None):
    env = {**os.environ, **FOUR, **(env_extra or {})}
    procs = [subprocess.Popen([sys.executable, *args_of(i)], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, start_new_session=True) for i in (1, 0)]
    return procs[::-1]  # [process 0, process 1]


def _finish(procs, timeout=600):
    outs = []
    for p in procs:
        try:
            outs.append(p.communicate(timeout=timeout)[0])
        finally:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
    return outs


def test_two_processes_make_the_one_process_edit(tmp_path):
    port, out = _port(), tmp_path / "edit.npz"
    procs = _pair(lambda i: ["-m", "tests.jaxedit.two_process_worker", str(i), str(port), str(out)])
    logs = _finish(procs)
    assert all(p.returncode == 0 for p in procs), "\n".join(l[-3000:] for l in logs)
    got = np.load(out)
    # the same edit in this process, on one device
    cfg, params, tok = world.load_model("tiny-random")
    hp = world.hparams_for("tiny-random", "memit", v_steps=3)
    layer = hp.layers[0]
    cases = tuple(counterfact.load_counterfact("edit", n=4, seed=0))
    groups = world.templates(params, cfg, tok, hp, None)
    c0 = world.covariances(params, cfg, tok, [layer], hp, None, progress=False)
    new, _ = editor.edit(params, cfg, tok, cases, hp, covariances=c0, templates=groups)
    delta = np.asarray(new["layers"]["down_proj"][layer] - params["layers"]["down_proj"][layer])
    nll = np.asarray([c.rewrite_nll + c.paraphrase_nll + c.neighborhood_nll
                      for c in metrics.evaluate(new, cfg, tok, cases, batch_size=4).cases])
    assert np.linalg.norm(delta) > 0
    rel = lambda a, b: np.linalg.norm(a - b) / np.linalg.norm(b)
    assert rel(got["c0"], np.asarray(c0[layer])) <= 1e-5
    assert rel(got["delta"], delta) <= 1e-5
    assert rel(got["nll"], nll) <= 1e-5


def _cells(path):
    return [r for r in results_log.read_jsonl(path) if r.get("type") == "cell"]


def test_a_two_process_sweep_writes_each_cell_once_also_after_a_process_dies(tmp_path):
    out, cache = tmp_path / "layer.jsonl", tmp_path / "cache"
    base = ["-m", "experiments.layer_sweep", "--model=tiny-random", "--layers=0,1", "--methods=memit", "--n=2",
            "--v_steps=2", f"--out={out}", f"--cache_dir={cache}", "--mesh=2x4", "--num_processes=2",
            "--heartbeat_timeout=5", f"--jit_cache={tmp_path / 'jit'}"]

    def args(port, pause=0):
        return lambda i: base + [f"--coordinator_address=localhost:{port}", f"--process_id={i}",
                                 f"--test_pause_after_cell={pause}"]

    first = _pair(args(_port(), pause=5))
    try:
        deadline = time.time() + 300
        while time.time() < deadline and not _cells(out) and all(p.poll() is None for p in first):
            time.sleep(0.5)
        assert _cells(out), "no cell finished before the kill"
        os.killpg(first[1].pid, signal.SIGKILL)  # process 1 dies in the middle of the sweep
        log0 = _finish(first[:1], timeout=180)[0]
    finally:
        for p in first:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
    assert first[0].returncode != 0
    # the survivor stops, naming the process that died (task 1) instead of waiting forever
    assert "unhealthy (stopped sending heartbeats):\n1\n" in log0, log0[-3000:]
    done = [c["key"]["layer"] for c in _cells(out)]
    assert len(done) == len(set(done)) and len(done) < 2

    again = _pair(args(_port()))
    logs = _finish(again)
    assert all(p.returncode == 0 for p in again), "\n".join(l[-3000:] for l in logs)
    cells = _cells(out)
    assert sorted(c["key"]["layer"] for c in cells) == [0, 1]  # every cell, each written once


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="process_id 2 must be in 0..1"):
        distributed.initialize("localhost:1234", 2, 2)
    with pytest.raises(ValueError, match="host:port"):
        distributed.initialize("localhost", 2, 0)
    distributed.initialize(None, 1, 0)  # one process: nothing to set up
    from experiments.program import parse_mesh
    with pytest.raises(ValueError, match="DATAxMODEL"):
        parse_mesh("2by4")
    assert parse_mesh("2x4") == (2, 4) and parse_mesh(None) is None
