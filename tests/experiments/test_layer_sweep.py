"""The layer sweep's one-pass scoring gives the per-model scoring's numbers (tiny random model)."""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from experiments import results_log

ROOT = Path(__file__).resolve().parents[2]


def test_one_pass_scoring_equals_one_model_per_edit(tmp_path):
    env = {**os.environ, "JAXEDIT_JIT_CACHE": str(tmp_path / "jit"), "JAX_PLATFORMS": "cpu",
           "JAX_DISABLE_MOST_OPTIMIZATIONS": "1"}  # small programs: compiling dominates, so compile less
    cells = {}
    for scoring in ("per_model", "one_pass"):
        out = tmp_path / f"{scoring}.jsonl"
        run = subprocess.run([sys.executable, "-m", "experiments.layer_sweep", "--model=tiny-random", "--layers=1",
                              "--methods=memit", "--n=3", f"--out={out}", f"--cache_dir={tmp_path / 'cache'}",
                              "--v_steps=3", f"--scoring={scoring}"], cwd=ROOT, env=env, capture_output=True,
                             timeout=300)
        assert run.returncode == 0, run.stderr.decode()[-3000:]
        cells[scoring] = {r["key"]["method"]: r for r in results_log.read_jsonl(out) if r.get("type") == "cell"}
    for method in ("memit",):
        one, alone = cells["one_pass"][method], cells["per_model"][method]
        assert one["scoring"] == "one_pass" and alone["scoring"] == "per_model"
        assert set(one["stage_seconds"]) == {"values", "solve", "scoring"}
        assert [c["case_id"] for c in one["cases"]] == [c["case_id"] for c in alone["cases"]]
        for a, b in zip(one["cases"], alone["cases"]):
            assert (a["es"], a["ps"], a["ns"]) == (b["es"], b["ps"], b["ns"])
            np.testing.assert_allclose([a[k] for k in ("em", "pm", "nm")], [b[k] for k in ("em", "pm", "nm")],
                                       rtol=1e-4, atol=1e-4)
        assert max(abs(c["em"]) for c in one["cases"]) > 0
