"""The sequential-batched sweep program on the tiny random model: every cell and batch recorded, and the
first batch's values (optimised on the unedited model) shared between methods through the value cache."""
import os
import subprocess
import sys
from pathlib import Path

from experiments import results_log

ROOT = Path(__file__).resolve().parents[2]


def test_cells_batches_and_shared_first_values(tmp_path):
    env = {**os.environ, "JAXEDIT_JIT_CACHE": str(tmp_path / "jit"), "JAX_PLATFORMS": "cpu",
           "JAX_DISABLE_MOST_OPTIMIZATIONS": "1"}  # small programs: compiling dominates, so compile less
    out, cache = tmp_path / "seq.jsonl", tmp_path / "cache"
    run = subprocess.run([sys.executable, "-m", "experiments.sequential_sweep", "--model=tiny-random",
                          "--batch_sizes=2,1", "--total=2", "--methods=memit,emmet", "--v_steps=2",
                          f"--out={out}", f"--cache_dir={cache}"], cwd=ROOT, env=env, capture_output=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr.decode()[-3000:]
    recs = results_log.read_jsonl(out)
    cells = {(r["key"]["method"], r["key"]["batch_size"]): r for r in recs if r["type"] == "cell"}
    assert set(cells) == {("memit", 2), ("emmet", 2), ("memit", 1), ("emmet", 1)}
    for (method, b), cell in cells.items():
        batches = [r for r in recs if r["type"] == "batch" and r["attempt"] == cell["attempt"]]
        assert [r["batch_index"] for r in batches] == list(range(2 // b)), (method, b)
        assert [r["edits_so_far"] for r in batches] == [b * (i + 1) for i in range(2 // b)]
        assert cell["final_all"]["n_cases"] == 2 and len(cell["before_cases"]) == 2
    # Only the unedited model's first batches reach the cache: cases 0 and 1 (MEMIT's B=2 batch), read
    # again by EMMET and by both B=1 runs; later batches' values (edited model) are not kept.
    stored = list((cache / "values").rglob("*.npz"))
    assert len(stored) == 2, stored
