"""A sequential MEMIT run on the tiny model with a checkpoint, optionally SIGKILLed after a batch.

python -m tests.jaxedit.editing.run_state_worker OUT_DIR KILL_AFTER_BATCH (-1: run to the end)

Records go to OUT_DIR/records.jsonl, one per batch, written only if that batch has none yet (the
sweeps' rule: a batch redone after a crash writes nothing twice); the final down_proj to
OUT_DIR/final.npy.
"""
import json
import os
import signal
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from jaxedit import compilation_cache, testing
from jaxedit.editing import schedule
from jaxedit.hparams import EditHparams, ValueHparams
from jaxedit.requests import EditRequest

REQUESTS = [EditRequest("The mother tongue of {} is", "Danielle Darrieux", "English", case_id=0),
            EditRequest("{} is a twin city of", "Lyon", "Beijing", case_id=1),
            EditRequest("The official religion of {} is", "Edwin of Northumbria", "Islam", case_id=2),
            EditRequest("{} plays the position of", "Sergio Ramos", "goalkeeper", case_id=3),
            EditRequest("{} is located in the continent of", "Paris", "Asia", case_id=4),
            EditRequest("{} plays the", "Toko Yasuda", "guitar", case_id=5)]
HPARAMS = EditHparams(method="memit", layers=(1,), value=ValueHparams(v_num_grad_steps=3), mom2_update_weight=1.0)


def covariance(cfg):
    rng = np.random.RandomState(0)
    a = rng.randn(cfg.intermediate_size, 4 * cfg.intermediate_size)
    return jnp.asarray(a @ a.T / a.shape[1] + 0.1 * np.eye(cfg.intermediate_size), jnp.float32)


def run(out: Path, kill_after: int):
    cfg, params, tok = testing.tiny_model(num_hidden_layers=2)
    records = out / "records.jsonl"

    def after_batch(index, new_params, batch, report):
        record = {"batch": index, "case_ids": [r.case_id for r in batch], "delta_norm": report.delta_norms[0]}
        written = {json.loads(line)["batch"] for line in records.open()} if records.exists() else set()
        if index not in written:
            with records.open("a") as f:
                f.write(json.dumps(record) + "\n")
        if index == kill_after:  # after the record, before the checkpoint: the worst moment
            os.kill(os.getpid(), signal.SIGKILL)
        return record

    final, outcomes = schedule.sequential_batched_edit(
        params, cfg, tok, REQUESTS, HPARAMS, covariances={1: covariance(cfg)}, templates=(("{}",),),
        batch_size=2, preserve_previous_edits=True, after_batch=after_batch, progress=False,
        checkpoint_dir=out / "checkpoint")
    np.save(out / "final.npy", np.asarray(final["layers"]["down_proj"]))
    (out / "outcomes.json").write_text(json.dumps([[o.index, o.report is None, o.extra] for o in outcomes]))


if __name__ == "__main__":
    compilation_cache.enable()  # $JAXEDIT_JIT_CACHE: the second and third runs load the first one's programs
    run(Path(sys.argv[1]), int(sys.argv[2]))
