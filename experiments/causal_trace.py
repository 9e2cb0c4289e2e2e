"""Causal tracing over the known facts (Meng et al. 2022, Figure 1 and the average indirect effects).

Goes through the knowns file in order until --n_facts facts the model knows are traced (its greedy
next token is the attribute's first token); each fact is one JSONL record, written as soon as it is
done: "status": "traced" with its scores (P(object) with each state restored, averaged over the
noise samples, per kind, layer and token), or "status": "skipped" with the reason (the model does
not know the fact; or the subject's boundaries are not token boundaries). A rerun skips facts that
have a record. At the end the plots and tables are written to --results_dir
(experiments.causal_trace_summary); --summarize_only just redraws them from --out.

  python -m experiments.causal_trace --n_facts=40 --noise_samples=3 --out=runs/causal_trace.jsonl
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

from absl import flags
from tqdm.auto import tqdm

from experiments import program
from experiments import results_log
from experiments import world

flags.DEFINE_string("knowns", None, "knowns JSON file (default $JAXEDIT_DATA/knowns/known_1000.json)")
flags.DEFINE_integer("n_facts", 40, "facts to trace (facts the model does not know are skipped and not counted)")
flags.DEFINE_integer("noise_samples", 10, "corrupted runs per fact")
flags.DEFINE_float("noise_factor", 3.0, "noise std in units of the std of the subject tokens' embeddings")
flags.DEFINE_integer("window", 10, "layers restored around each centre layer for MLP and attention outputs")
flags.DEFINE_integer("noise_seed", 0, "seed of the corruption noise (each fact's noise comes from it and its known_id)")
flags.DEFINE_string("results_dir", "experiments/results/causal_trace", "where the plots and tables go")
flags.DEFINE_string("heatmap_facts", None, "comma-separated known_ids to draw as token x layer heatmaps "
                    "(default: the first two traced facts)")
flags.DEFINE_boolean("summarize_only", False, "only redraw the plots and tables from --out")
program.define_common_flags("runs/causal_trace.jsonl")
FLAGS = flags.FLAGS


def fact_key(known_id: int, knowns_name: str) -> dict:
    return {"sweep": "causal_trace", "model": FLAGS.model, "knowns": knowns_name, "known_id": int(known_id),
            "noise_samples": FLAGS.noise_samples, "noise_factor": FLAGS.noise_factor, "window": FLAGS.window,
            "noise_seed": FLAGS.noise_seed}


def _rounded(array) -> list:
    return [[float(f"{x:.6g}") for x in row] for row in array]


def trace_record(params, cfg, tok, fact, encoded, noise_std: float, tc) -> dict:
    """The JSONL record of one fact: traced, or skipped with its reason."""
    from jaxedit import tracing

    about = {"subject": fact.subject, "attribute": fact.attribute, "prompt": fact.prompt}
    if isinstance(encoded, Exception):
        return {**about, "status": "skipped", "reason": "subject_tokens", "detail": str(encoded)}
    predicted = tracing.greedy_next_token(params, cfg, encoded, tc)
    if predicted not in encoded.answers:
        return {**about, "status": "skipped", "reason": "not_known", "prediction": tok.decode([predicted])}
    t0 = time.perf_counter()
    result = tracing.trace_fact(params, cfg, encoded, predicted, noise_std, tc)
    return {**about, "status": "traced", "tokens": [tok.decode([t]) for t in encoded.tokens],
            "subject_range": list(encoded.subject), "target": predicted, "target_text": tok.decode([predicted]),
            "p_clean": result.p_clean, "p_corrupt": result.p_corrupt, "noise_std": noise_std,
            "scores": {kind: _rounded(result.scores[k]) for k, kind in enumerate(tracing.KINDS)},
            "seconds": time.perf_counter() - t0}


def main(argv):
    del argv
    from experiments import causal_trace_summary
    from jaxedit import tracing

    program.init_jax()
    heatmaps = program.parse_int_list(FLAGS.heatmap_facts) if FLAGS.heatmap_facts else None
    if FLAGS.summarize_only:
        causal_trace_summary.summarize(results_log.read_jsonl(FLAGS.out), FLAGS.results_dir, heatmaps)
        return
    knowns_path = Path(FLAGS.knowns) if FLAGS.knowns else tracing.knowns.default_knowns_file()
    facts = tracing.read_knowns(knowns_path)
    tc = tracing.TraceConfig(noise_samples=FLAGS.noise_samples, noise_factor=FLAGS.noise_factor,
                             window=FLAGS.window, seed=FLAGS.noise_seed)  # checked before the model loads
    cfg, params, tok = world.load_model(FLAGS.model)
    log = results_log.ResultsLog(FLAGS.out)
    encoded = tracing.encode_facts(tok, facts)
    # As in the paper: over the subjects of all the facts of the file.
    noise_std = tracing.embedding_noise_std(params, tracing.subject_token_ids(encoded), tc.noise_factor)
    done = {results_log.key_id(r["key"]): r for r in log.records if r.get("type") == "cell" and "key" in r}
    logging.info("causal trace: %d facts in %s, noise std %.4f, %d records in %s", len(facts), knowns_path,
                 noise_std, len(done), FLAGS.out)
    traced = skipped = 0
    bar = tqdm(total=FLAGS.n_facts, desc="facts traced")
    for fact, enc in zip(facts, encoded):
        if traced >= FLAGS.n_facts:
            break
        key = fact_key(fact.known_id, knowns_path.name)
        record = done.get(results_log.key_id(key))
        if record is None:
            record = log.append({"type": "cell", "key": key, "attempt": results_log.new_attempt(),
                                 **trace_record(params, cfg, tok, fact, enc, noise_std, tc)})
        if record["status"] == "traced":
            traced += 1
            bar.update()
        else:
            skipped += 1
            bar.set_postfix(skipped=skipped)
    bar.close()
    if traced < FLAGS.n_facts:
        logging.warning("the knowns file ran out: %d facts traced of %d asked", traced, FLAGS.n_facts)
    logging.info("%d facts traced, %d skipped", traced, skipped)
    causal_trace_summary.summarize(results_log.read_jsonl(FLAGS.out), FLAGS.results_dir, heatmaps)


if __name__ == "__main__":
    program.run(main)
