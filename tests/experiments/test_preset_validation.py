"""The preset validation grid: cells written once, a restart skips them, the rule and the table."""
import os
import subprocess
import sys
from pathlib import Path

from experiments import preset_validation, results_log

ROOT = Path(__file__).resolve().parents[2]


def test_choose_keeps_neighbourhood_within_margin():
    before = {"ns": 60.0}
    cells = [{"aggregate": {"s": 80.0, "ns": 50.0}}, {"aggregate": {"s": 70.0, "ns": 58.0}},
             {"aggregate": {"s": 65.0, "ns": 61.0}}]
    assert preset_validation.choose(cells, before, 5.0) is cells[1]
    assert preset_validation.choose(cells, before, 20.0) is cells[0]
    assert preset_validation.choose(cells[:1], before, 1.0) is None


def test_grid_runs_and_resumes(tmp_path):
    out = tmp_path / "validation.jsonl"
    env = {**os.environ, "JAXEDIT_JIT_CACHE": str(tmp_path / "jit"), "JAX_PLATFORMS": "cpu",
           "JAX_DISABLE_MOST_OPTIMIZATIONS": "1"}  # small programs: compiling dominates, so compile less
    args = [sys.executable, "-m", "experiments.preset_validation", "--model=tiny-random", "--method=memit",
            "--grid_a=10,1000", "--grid_b=1", "--n=3", f"--out={out}", f"--cache_dir={tmp_path / 'cache'}",
            "--v_steps=2"]
    first = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, timeout=300)
    assert first.returncode == 0, first.stderr.decode()[-3000:]
    cells = [r for r in results_log.read_jsonl(out) if r.get("type") == "cell"]
    assert sorted(r["key"]["mom2_update_weight"] for r in cells) == [10.0, 1000.0]
    for r in cells:
        assert len(r["cases"]) == 3 and r["key"]["counterfact"] == "train" and len(r["case_ids"]) == 3
    text = out.with_suffix(".memit.md").read_text()
    assert "| mom2_update_weight | layer |" in text and "3 validation cases" in text
    assert "\n| 10 | 1 |" in text and "\n| 1000 | 1 |" in text
    again = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, timeout=300)
    assert again.returncode == 0, again.stderr.decode()[-3000:]
    assert len(out.read_bytes().splitlines()) == 2  # nothing recomputed
