"""The GPU benchmark's dry mode: the command a lent GPU would run, on a tiny bfloat16 config, on CPU."""
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_gpu_benchmark_dry_mode_runs_every_stage(tmp_path):
    out = tmp_path / "r.json"
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "JAX_DISABLE_MOST_OPTIMIZATIONS": "1"}  # small programs: compiling dominates, so compile less
    run = subprocess.run([sys.executable, "-m", "benchmarks.gpu_llama3_8b", "--dry", "--json_out", str(out)],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    res = json.loads(out.read_text())
    # the real run's dtype and methods, at the dry sizes
    assert res["config"] == "dry (tiny)" and res["dtype"] == "bfloat16"
    assert res["n"] == 4 and res["v_num_grad_steps"] == 2 and res["platform"] == "cpu"
    assert res["cov_tokens"] >= 4096 and res["value_tflop"] > 0 and res["peak_memory_gib"] > 0
    for k in ("init_params", "templates", "C0_all_layers", "values", "keys[memit]", "solve[memit]",
              "keys[emmet]", "solve[emmet]"):
        assert res["seconds"][k] >= 0, k
    for m in ("memit", "emmet"):
        assert res[f"delta_norm[{m}]"] > 0  # an update was made and is finite
    assert "| values" in run.stdout and "peak memory" in run.stdout
