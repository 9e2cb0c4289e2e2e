"""One of two processes (4 forced host devices each) making a MEMIT edit on one global 2x4 mesh.

  python -m tests.jaxedit.two_process_worker PROCESS_ID PORT OUT.npz

Run by test_distributed.py; process 0 writes the edit's down_proj change and the unedited/edited NLLs.
"""
from __future__ import annotations

import sys

import numpy as np


def main(process_id: int, port: str, out: str) -> None:
    from jaxedit import distributed

    distributed.initialize(f"localhost:{port}", 2, process_id, heartbeat_timeout_seconds=20)
    import jax

    from experiments import world
    from jaxedit.data import counterfact
    from jaxedit.editing import editor
    from jaxedit.eval import metrics
    from llama3_flax import sharding

    assert jax.process_count() == 2 and jax.device_count() == 8 and jax.local_device_count() == 4
    cfg, params, tok = world.load_model("tiny-random")
    hp = world.hparams_for("tiny-random", "memit", v_steps=3)
    layer = hp.layers[0]
    cases = tuple(counterfact.load_counterfact("edit", n=4, seed=0))
    mesh = sharding.make_mesh(2, 4)  # over both processes' devices
    sharded = sharding.shard_params(params, cfg, mesh)
    assert not sharded["layers"]["down_proj"].is_fully_addressable  # really spread over both processes
    groups = world.templates(sharded, cfg, tok, hp, None)
    c0 = world.covariances(sharded, cfg, tok, [layer], hp, None, progress=False)
    new, report = editor.edit(sharded, cfg, tok, cases, hp, covariances=c0, templates=groups)
    delta = distributed.to_host(new["layers"]["down_proj"][layer] - sharded["layers"]["down_proj"][layer])
    nll = [c.rewrite_nll + c.paraphrase_nll + c.neighborhood_nll
           for c in metrics.evaluate(new, cfg, tok, cases, batch_size=4).cases]
    if distributed.is_writer():
        np.savez(out, delta=delta, nll=np.asarray(nll), c0=distributed.to_host(c0[layer]))
    distributed.agree("written")


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2], sys.argv[3])
