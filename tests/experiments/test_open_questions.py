"""The open-question programs on the tiny random model: the solve diagnostics, layer-window and
neighbour-KL programs write one record per cell and resume, and the summary writes a table and a plot
per question. The programs run one after another on one cache folder and one compilation cache, on
the same three cases, so the later ones read the values and compiled programs of the first."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from experiments import open_questions_summary, results_log

ROOT = Path(__file__).resolve().parents[2]
COMMON = ["--model=tiny-random", "--v_steps=2"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("open_questions")
    env = {**os.environ, "JAXEDIT_JIT_CACHE": str(tmp / "jit"), "JAX_PLATFORMS": "cpu",
           "JAX_DISABLE_MOST_OPTIMIZATIONS": "1"}  # small programs: compiling dominates, so compile less
    out = {name: tmp / f"{name}.jsonl" for name in ("diagnostics", "windows", "kl")}
    commands = {
        "diagnostics": ["experiments.solve_diagnostics", "--layers=0,1", "--batch_sizes=1,3", "--n_control=3",
                        "--paired_resamples=50"],
        "windows": ["experiments.layer_window_sweep", "--starts=0", "--windows=1,2", "--batch_sizes=2",
                    "--selection_size=3"],
        "kl": ["experiments.neighbour_kl", "--layers=0,1", "--n=3"],
    }
    for name, (module, *args) in commands.items():
        run = subprocess.run([sys.executable, "-m", module, *COMMON, *args, f"--out={out[name]}",
                              f"--cache_dir={tmp / 'cache'}"], cwd=ROOT, env=env, capture_output=True, timeout=600)
        assert run.returncode == 0, (name, run.stderr.decode()[-3000:])
    # a second run finds every cell done and adds nothing (the solve diagnostics check before loading the model)
    again = subprocess.run([sys.executable, "-m", "experiments.solve_diagnostics", *COMMON, *commands["diagnostics"][1:],
                            f"--out={out['diagnostics']}", f"--cache_dir={tmp / 'cache'}"], cwd=ROOT, env=env,
                           capture_output=True, timeout=600)
    assert again.returncode == 0 and b"0 to run" in again.stderr, again.stderr.decode()[-3000:]
    return tmp, out


def _cells(path):
    return [r for r in results_log.read_jsonl(path) if r["type"] == "cell"]


def test_solve_diagnostics_records(runs):
    _, out = runs
    cells = _cells(out["diagnostics"])
    assert sorted((c["key"]["method"], c["key"]["layer"], c["key"]["batch_size"]) for c in cells) == sorted(  # once each
        (m, l, b) for m in ("memit", "emmet") for l in (0, 1) for b in (1, 3))
    for c in cells:
        d, b = c["diagnostics"], c["key"]["batch_size"]
        assert d["n_keys"] == b and c["batch_per_d_ff"] == b / c["d_ff"]
        assert 0 < d["preservation_cost"] and d["delta_norm"] > 0 and 1 - 1e-9 <= d["effective_rank"] <= b + 1e-9
        assert len(c["cases"]) == len(c["before_cases"]) == b and set(c["paired"]) >= {"es", "ps", "ns", "s"}
        assert [r["case_id"] for r in c["cases"]] == [r["case_id"] for r in c["before_cases"]]
        para = c["paraphrase"]
        assert len(para["cases"]) + para["skipped"] == b and len(para["control_span_fraction"]) == 3
        assert all(-1e-9 <= r["own_fraction"] <= r["span_fraction"] + 1e-9 <= 1 + 2e-9 for r in para["cases"])
    emmet_single = [c for c in cells if c["key"]["method"] == "emmet" and c["key"]["batch_size"] == 1]
    assert all(c["diagnostics"]["residual"] < 1e-6 for c in emmet_single)  # one edit: equality constraints


def test_layer_window_records(runs):
    _, out = runs
    cells = _cells(out["windows"])
    assert len(cells) == 4
    for c in cells:
        k = c["key"]
        assert c["layers"] == list(range(k["start"], k["start"] + k["window"]))
        assert list(c["delta_norms"]) == [str(l) for l in c["layers"]] and all(v > 0 for v in c["delta_norms"].values())
        assert len(c["cases"]) == 2 and len(c["before_cases"]) == 2 and c["aggregate"]["em"] is not None


def test_neighbour_kl_records(runs):
    _, out = runs
    cells = _cells(out["kl"])
    assert sorted(c["key"]["layer"] for c in cells) == [0, 1]
    for c in cells:
        assert len(c["kl"]) == 3 and all(r[k] >= 0 for r in c["kl"] for k in ("neighbour", "rewrite", "paraphrase"))
        assert len(c["cases"]) == 3 and len(c["delta_norms"]) == 3
    assert max(r["rewrite"] for c in cells for r in c["kl"]) > 0  # the edits move their own prompt


def test_summary_writes_a_table_and_a_plot_per_question(runs):
    tmp, out = runs
    parts = open_questions_summary.summarize(out["windows"], out["diagnostics"], out["kl"], tmp / "summary",
                                             held_out=(3,), trough=(0,), late=(1,), ps_sizes=(1, 3), n_resamples=50)
    assert set(parts) == {"layer_windows", "batch_degradation", "late_layers"}
    for name in parts:
        assert (tmp / "summary" / f"{name}.md").read_text() and (tmp / "summary" / f"{name}.png").stat().st_size > 0
    assert "layers 0-1 − layer 0" in parts["layer_windows"]
    assert "| MEMIT | 1 | 3 | 0 | held out |" in parts["batch_degradation"]
    assert "Late layers − trough layers" in parts["late_layers"] and "| MEMIT | 0-0 | 1-1 |" in parts["late_layers"]
    assert "the paraphrase's key against the batch keys' span" in parts["late_layers"]
