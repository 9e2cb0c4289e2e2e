"""The lifelong-editing program on the tiny random model: monitored batch records, a cell record, and a
rerun that neither redoes nor rewrites anything."""
import os
import subprocess
import sys
from pathlib import Path

from experiments import lifelong, lifelong_summary, results_log

ROOT = Path(__file__).resolve().parents[2]


def test_measures_after_every_k_edits_and_the_last_batch():
    assert [lifelong.measures_after(i, 3, 10, 4) for i in range(4)] == [False, True, True, True]  # 3, 6, 9, 10
    assert [lifelong.measures_after(i, 2, 8, 4) for i in range(4)] == [False, True, False, True]
    assert [lifelong.measures_after(i, 8, 8, 64) for i in range(1)] == [True]


def test_monitored_records_and_a_rerun_that_adds_nothing(tmp_path):
    env = {**os.environ, "JAXEDIT_JIT_CACHE": str(tmp_path / "jit"), "JAX_PLATFORMS": "cpu",
           "JAX_DISABLE_MOST_OPTIMIZATIONS": "1"}  # small programs: compiling dominates, so compile less
    out, cache = tmp_path / "lifelong.jsonl", tmp_path / "cache"
    command = [sys.executable, "-m", "experiments.lifelong", "--model=tiny-random", "--batch_sizes=2",
               "--total=4", "--methods=memit", "--v_steps=2", "--monitor_every=4", "--monitor_questions=2",
               "--monitor_tokens=64", "--monitor_generations=0", "--norm_constraint=0.5", "--most_probable_stop",
               f"--out={out}", f"--cache_dir={cache}"]
    for _ in range(2):
        run = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, timeout=300)
        assert run.returncode == 0, run.stderr.decode()[-3000:]
    recs = results_log.read_jsonl(out)
    assert [r["type"] for r in recs] == ["batch", "batch", "cell"]  # the rerun wrote nothing
    first, second, cell = recs
    assert cell["key"]["norm_constraint"] == 0.5 and cell["key"]["most_probable_stop"] is True
    assert cell["hparams"]["norm_constraint"] == 0.5 and cell["stopped"] is None and cell["edits"] == 4
    assert "monitor" not in first and first["edits_so_far"] == 2  # measured every 4 edits
    monitor = second["monitor"]
    assert second["edits_per_dff"] == 4 / cell["d_ff"] and monitor["retention"]["n_cases"] == 4
    assert set(monitor["general"]) == {"sst2", "mrpc", "cola", "rte", "nli", "mmlu"}
    assert monitor["weight_change"]["1"] > 0 and cell["unedited"]["weight_change"]["1"] == 0
    assert cell["final"] == monitor and len(list((cache / "lifelong").glob("run-*.npz"))) == 1
    # the summary's table, general-ability table and plot from these records
    latest = lifelong_summary.runs(recs)
    assert list(latest) == [("memit", 2, True, 0.5)] and len(latest[("memit", 2, True, 0.5)]["batches"]) == 1
    text = lifelong_summary.table(latest, n_resamples=50)
    assert "| memit B=2 (MPES+norm 0.5) | 4 |" in text
    assert "| unedited |" in lifelong_summary.general_table(latest) and "| 4 |" not in lifelong_summary.general_table(latest)
    lifelong_summary.plot(latest, tmp_path / "lifelong.png", n_resamples=50)
    assert (tmp_path / "lifelong.png").stat().st_size > 10_000
