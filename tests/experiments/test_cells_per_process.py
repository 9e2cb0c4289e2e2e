"""--cell_parallelism=per_process: two processes of 4 forced host devices each, each on its own local
2x2 mesh, share a 6-cell layer sweep (tiny random model) and append to one results file. Process 1
is killed after its first cell; process 0 finishes its share regardless; the same two commands run
again finish the rest. Every cell is written once and equals the one-process run on the same 2x2
mesh (that a mesh gives the one-device numbers is tested in tests/llama3_flax and test_distributed)."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from experiments import results_log

ROOT = Path(__file__).resolve().parents[2]
ENV = {"XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu",
       "JAX_DISABLE_MOST_OPTIMIZATIONS": "1"}  # small programs: compiling dominates, so compile less
LAYERS, METHODS = (0, 1, 2), ("memit", "emmet")


def _cells(path):
    return [r for r in results_log.read_jsonl(path) if r.get("type") == "cell"]


def _cell_ids(path):
    return sorted((c["key"]["method"], c["key"]["layer"]) for c in _cells(path))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("per_process")
    env = {**os.environ, **ENV}
    base = [sys.executable, "-m", "experiments.layer_sweep", "--model=tiny-random",
            f"--layers={','.join(map(str, LAYERS))}", f"--methods={','.join(METHODS)}", "--n=2", "--v_steps=2",
            "--mesh=2x2", f"--jit_cache={tmp / 'jit'}"]  # one compilation cache: later runs load programs
    one = subprocess.run(base + [f"--out={tmp / 'one.jsonl'}", f"--cache_dir={tmp / 'cache_one'}"], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]

    out = tmp / "two.jsonl"

    def command(i, pause=0):
        return base + [f"--out={out}", f"--cache_dir={tmp / 'cache_two'}", "--cell_parallelism=per_process",
                       "--num_processes=2", f"--process_id={i}", f"--test_pause_after_cell={pause}"]

    def start(i, pause=0):
        return subprocess.Popen(command(i, pause), cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True)

    # process 1 holds on after each cell until killed; process 0 runs its share to the end meanwhile
    first = [start(0), start(1, pause=600)]
    try:
        log0 = first[0].communicate(timeout=300)[0]
        deadline = time.time() + 300
        while time.time() < deadline and first[1].poll() is None and len(_cells(out)) < 3:
            time.sleep(0.3)
        os.killpg(first[1].pid, signal.SIGKILL)
        log1 = first[1].communicate(timeout=60)[0]
    finally:
        for p in first:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
    after_kill = _cell_ids(out)
    again = [start(0), start(1)]
    logs = [p.communicate(timeout=300)[0] for p in again]
    return {"one": tmp / "one.jsonl", "two": out, "first_rc": [p.returncode for p in first],
            "first_logs": [log0, log1], "after_kill": after_kill, "again_rc": [p.returncode for p in again],
            "again_logs": logs}


def test_a_killed_process_leaves_only_its_own_unfinished_cells(runs):
    assert runs["first_rc"][0] == 0, runs["first_logs"][0][-3000:]  # the survivor was not stopped
    assert runs["first_rc"][1] == -signal.SIGKILL
    # process 0's share (layer 0: the most work, a value loop over all 4 layers) and process 1's first cell
    assert runs["after_kill"] == [("emmet", 0), ("memit", 0), ("memit", 1)], runs["first_logs"][1][-3000:]
    assert runs["again_rc"] == [0, 0], "\n".join(l[-3000:] for l in runs["again_logs"])
    assert "2 cells, 2 already done, 0 to run" in runs["again_logs"][0]
    assert "4 cells, 1 already done, 3 to run" in runs["again_logs"][1]
    ids = _cell_ids(runs["two"])
    assert ids == sorted((m, l) for m in METHODS for l in LAYERS)  # every cell, each written once


def test_cells_split_between_processes_equal_the_one_process_run(runs):
    one = {(c["key"]["method"], c["key"]["layer"]): c for c in _cells(runs["one"])}
    two = {(c["key"]["method"], c["key"]["layer"]): c for c in _cells(runs["two"])}
    assert sorted(one) == sorted(two) and len(one) == 6
    for k, a in one.items():
        b = two[k]
        assert a["key"] == b["key"]
        assert [c["case_id"] for c in a["cases"]] == [c["case_id"] for c in b["cases"]]
        for x, y in zip(a["cases"], b["cases"]):
            assert (x["es"], x["ps"], x["ns"]) == (y["es"], y["ps"], y["ns"]), k
        margins = lambda r: np.array([[c[m] for m in ("em", "pm", "nm")] for c in r["cases"]])
        np.testing.assert_allclose(margins(b), margins(a), rtol=0, atol=1e-5)
        np.testing.assert_allclose(b["value_loss"], a["value_loss"], rtol=1e-5)
        np.testing.assert_allclose(b["delta_norms"], a["delta_norms"], rtol=1e-5)
