"""experiments.causal_trace end to end on the tiny random model: facts traced and skipped, one record
each, a rerun asking for more traces only the new facts, plots and tables written."""
import json
import os
import subprocess
import sys
from pathlib import Path

from experiments import results_log
from jaxedit import testing, tracing

ROOT = Path(__file__).resolve().parents[2]


def _word_for(tok, token_id: int) -> str:
    """A word the tiny model's hashing tokenizer maps to token_id."""
    return next(w for w in (f"w{k}" for k in range(200000))
                if tok(w, add_special_tokens=False)["input_ids"] == [token_id])


def _knowns(path: Path) -> None:
    cfg, params, tok = testing.tiny_model()
    prompts = [("Vinson Massif", "Vinson Massif is located in the continent of"),
               ("Beats Music", "Beats Music is owned by"),
               ("Vins", "Vinson Massif is a mountain in"),  # the subject ends inside a word
               ("Audi", "The maker of the Audi is"),
               ("Toko Yasuda", "Toko Yasuda plays the")]
    records = []
    for i, (subject, prompt) in enumerate(prompts):
        fact = tracing.KnownFact(i, subject, "x", prompt)
        attribute = "nothing"
        if i != 2:
            predicted = tracing.greedy_next_token(params, cfg, tracing.encode_fact(tok, fact))
            attribute = _word_for(tok, predicted if i != 1 else (predicted + 1) % cfg.vocab_size)
        records.append({"known_id": i, "subject": subject, "attribute": attribute, "prompt": prompt,
                        "relation_id": "P0"})
    path.write_text(json.dumps(records))


def _run(tmp_path, knowns, out, n_facts):
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "JAX_DISABLE_MOST_OPTIMIZATIONS": "1"}  # small programs: compiling dominates, so compile less
    args = [sys.executable, "-m", "experiments.causal_trace", "--model=tiny-random", f"--knowns={knowns}",
            f"--n_facts={n_facts}", "--noise_samples=2", f"--out={out}", f"--results_dir={tmp_path / 'results'}",
            f"--jit_cache={tmp_path / 'jit'}", f"--cache_dir={tmp_path / 'cache'}"]
    done = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, timeout=300)
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    return [r for r in results_log.read_jsonl(out) if r.get("type") == "cell"]


def test_traces_skips_and_resumes(tmp_path):
    knowns, out = tmp_path / "knowns.json", tmp_path / "trace.jsonl"
    _knowns(knowns)
    first = _run(tmp_path, knowns, out, n_facts=2)
    assert [(r["key"]["known_id"], r["status"]) for r in first] == [(0, "traced"), (1, "skipped"), (2, "skipped"),
                                                                    (3, "traced")]
    assert [r.get("reason") for r in first[1:3]] == ["not_known", "subject_tokens"]
    traced = first[0]
    assert len(traced["scores"]["mlp"]) == 4 and len(traced["scores"]["mlp"][0]) == len(traced["tokens"])
    assert 0 < traced["p_corrupt"] and 0 < traced["p_clean"] < 1
    before = out.read_bytes()

    second = _run(tmp_path, knowns, out, n_facts=3)
    assert out.read_bytes().startswith(before)  # nothing redone or rewritten
    assert [r["key"]["known_id"] for r in second] == [0, 1, 2, 3, 4] and second[4]["status"] == "traced"

    results = tmp_path / "results"
    text = (results / "causal_trace.md").read_text()
    assert "5 facts looked at in file order: 3 traced, 2 skipped (1 not_known, 1 subject_tokens)" in text
    for name in ("average_indirect_effect.png", "average_indirect_effect_grid.png", "causal_trace_0.png",
                 "causal_trace_3.png"):
        assert (results / name).stat().st_size > 0, name
