"""Sequential runs that resume mid-way (run_state), and runs that after_batch stops."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from jaxedit import testing
from jaxedit.editing import run_state, schedule
from tests.jaxedit.editing import run_state_worker as worker

ROOT = Path(__file__).resolve().parents[3]


def _worker(out: Path, kill_after: int) -> int:
    out.mkdir(exist_ok=True)
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT), JAXEDIT_JIT_CACHE=str(out.parent / "jit"))
    return subprocess.run([sys.executable, "-m", "tests.jaxedit.editing.run_state_worker", str(out),
                           str(kill_after)], cwd=ROOT, env=env, timeout=300).returncode


def _records(out: Path):
    return [json.loads(line) for line in (out / "records.jsonl").open()]


def test_a_run_killed_mid_way_resumes_to_the_same_params_and_records(tmp_path):
    killed, whole = tmp_path / "killed", tmp_path / "whole"
    assert _worker(killed, kill_after=1) == -9  # SIGKILLed after batch 1's record, before its checkpoint
    assert [r["batch"] for r in _records(killed)] == [0, 1] and not (killed / "final.npy").exists()
    assert _worker(killed, kill_after=-1) == 0  # the same command again: batch 1 is redone, 2 is new
    assert _worker(whole, kill_after=-1) == 0  # the uninterrupted run
    np.testing.assert_allclose(np.load(killed / "final.npy"), np.load(whole / "final.npy"), rtol=1e-6, atol=1e-7)
    got, want = _records(killed), _records(whole)
    assert [r["batch"] for r in got] == [0, 1, 2]  # each record once
    assert [r["case_ids"] for r in got] == [[0, 1], [2, 3], [4, 5]]
    np.testing.assert_allclose([r["delta_norm"] for r in got], [r["delta_norm"] for r in want], rtol=1e-6)
    # the resumed run restored batch 0 from the checkpoint (no report) and ran batches 1 and 2
    outcomes = json.loads((killed / "outcomes.json").read_text())
    assert [(i, restored) for i, restored, _ in outcomes] == [(0, True), (1, False), (2, False)]


def _tiny_run(tmp_path, after_batch, **kw):
    cfg, params, tok = testing.tiny_model(num_hidden_layers=2)
    return schedule.sequential_batched_edit(
        params, cfg, tok, worker.REQUESTS[:4], worker.HPARAMS, covariances={1: worker.covariance(cfg)},
        templates=(("{}",),), batch_size=1, after_batch=after_batch, progress=False, **kw)


def test_after_batch_stops_a_run_and_a_resumed_run_stays_stopped(tmp_path):
    def guard(index, params, batch, report):
        return schedule.StopEditing("collapse: constructed", {"batch": index}) if index == 1 else {"batch": index}

    final, outcomes = _tiny_run(tmp_path, guard, checkpoint_dir=tmp_path / "ckpt")
    assert [o.index for o in outcomes] == [0, 1]
    assert [o.stopped for o in outcomes] == [None, "collapse: constructed"] and outcomes[1].extra == {"batch": 1}
    again, resumed = _tiny_run(tmp_path, lambda *a: pytest.fail("a stopped run ran again"),
                               checkpoint_dir=tmp_path / "ckpt")
    assert [(o.index, o.stopped, o.report) for o in resumed] == [(0, None, None), (1, "collapse: constructed", None)]
    np.testing.assert_array_equal(np.asarray(again["layers"]["down_proj"]), np.asarray(final["layers"]["down_proj"]))


def test_bad_checkpoints_are_named(tmp_path):
    cfg, params, tok = testing.tiny_model(num_hidden_layers=2)
    identity = run_state.run_identity(params, cfg, worker.REQUESTS, worker.HPARAMS, 2, True)
    assert identity != run_state.run_identity(params, cfg, worker.REQUESTS, worker.HPARAMS, 1, True)
    run_state.state_path(tmp_path, identity).write_bytes(b"not an npz")
    with pytest.raises(run_state.CheckpointError, match="unreadable.*delete it"):
        run_state.load_state(tmp_path, identity)
    state = run_state.RunState(done=1, down_proj={1: np.zeros((2, 2))}, carried_keys={}, extras=({"a": 1},))
    run_state.save_state(tmp_path, "other", state)
    os.replace(run_state.state_path(tmp_path, "other"), run_state.state_path(tmp_path, identity))
    with pytest.raises(run_state.CheckpointError, match="does not belong to this run"):
        run_state.load_state(tmp_path, identity)
    with pytest.raises(TypeError, match="keeps what after_batch returns as JSON"):
        run_state.save_state(tmp_path, identity, run_state.RunState(1, {}, {}, (object(),)))
