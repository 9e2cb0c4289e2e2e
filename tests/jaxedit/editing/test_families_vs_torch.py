"""ROME, MEMIT, EMMET and AlphaEdit on tiny random Qwen2 (q/k/v biases) and Mistral (a sliding window
shorter than every prompt) models: ES 100 on the edited requests, the input tree untouched, and keys,
values and Delta W equal to the PyTorch reference (baselines.torch_reference) run on transformers'
Qwen2ForCausalLM / MistralForCausalLM holding the same weights; causal tracing on them."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxedit
from jaxedit import testing
from jaxedit.hparams import EditHparams, ValueHparams
from jaxedit.requests import EditRequest
from jaxedit.tracing import knowns, trace
from llama3_flax import config, model

# The prompts end at the subject, so the target is read at the edited token itself: a random model's
# attention carries too little from one token to the next for an edit to move a later token's
# prediction reliably. Everything before the subject (and each template's prefix) still goes through
# the biased projections and the sliding window.
REQUESTS = (
    EditRequest(prompt="The home town of {}", subject="Ada", target_new="Rome", target_true="Oslo", case_id=0,
                paraphrase_prompts=("Where she was born: Ada",), neighborhood_prompts=("The home town of Bob",)),
    EditRequest(prompt="The sport played by {}", subject="Kim Lee", target_new="golf", target_true="judo",
                case_id=1, paraphrase_prompts=("Every Sunday, Kim Lee",), neighborhood_prompts=("The sport played by Sam",)),
    EditRequest(prompt="The maker of the {}", subject="Zeta 5", target_new="Sony", target_true="Acme", case_id=2,
                paraphrase_prompts=("The phone called Zeta 5",), neighborhood_prompts=("The maker of the Iota 2",)),
)
TEMPLATES = (("{}",), ("Once upon a time. {}", "It was cold. {}"))
VALUE = ValueHparams(v_num_grad_steps=20)
STD = 0.1
WINDOW = 3  # tokens: every prompt is longer
VOCAB = 256
TOL = 1e-4  # relative, jaxedit against PyTorch


def rel(got, want) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


def _model(arch):
    cfg = config.tiny(architecture=arch, sliding_window=WINDOW if arch == "mistral" else None, vocab_size=VOCAB,
                      num_hidden_layers=4, rope_theta=1e6 if arch == "qwen2" else 1e4)
    rng = np.random.default_rng(0)

    def init(path, shape):  # NumPy draws: no program to compile; unit-scale norms, biases 3x the weights
        name = jax.tree_util.keystr(path)
        if "norm" in name:
            return jnp.asarray(1 + 0.1 * rng.standard_normal(shape), jnp.float32)
        return jnp.asarray((3 if "bias" in name else 1) * STD * rng.standard_normal(shape), jnp.float32)

    params = jax.tree_util.tree_map_with_path(init, model.param_shapes(cfg), is_leaf=lambda x: isinstance(x, tuple))
    # C0 of rank 48 < F = 96 plus a small ridge: positive definite for the preservation solves, with
    # a null space (eigenvalues 1e-3 < AlphaEdit's threshold 2e-2) for AlphaEdit
    C0 = {}
    for layer in (0, 1):
        a = rng.normal(size=(cfg.intermediate_size, 48)) * 0.3
        C0[layer] = a @ a.T / 48 + 1e-3 * np.eye(cfg.intermediate_size)
    return cfg, params, C0


HPARAMS = {
    "rome": EditHparams(method="rome", layers=(1,), value=VALUE),
    "memit": EditHparams(method="memit", layers=(0, 1), value=VALUE, mom2_update_weight=1.0),
    "emmet": EditHparams(method="emmet", layers=(1,), value=VALUE, mom2_update_weight=1.0),
    "alphaedit": EditHparams(method="alphaedit", layers=(0, 1), value=VALUE, l2=0.1),
}


@pytest.mark.parametrize("arch", ["qwen2", "mistral"])
def test_editors_match_the_pytorch_reference(arch):
    import torch

    from baselines import torch_reference as tb

    torch.set_num_threads(1)
    cfg, params, C0 = _model(arch)
    tok = testing.WordTokenizer(VOCAB)
    before = jax.tree_util.tree_map(lambda x: np.array(x, copy=True), params)
    ref = tb.torch_model(cfg, params, attn_implementation="eager")
    assert type(ref).__name__ == config.ARCHITECTURES[arch]
    flat = [t for g in TEMPLATES for t in g]
    report_lines, edited = [], {}
    for site, requests, methods in (("mlp", REQUESTS[:1], ("rome",)), ("resid", REQUESTS, ("memit", "emmet", "alphaedit"))):
        first = HPARAMS[methods[0]]
        ours = jaxedit.edit_values(params, cfg, tok, requests, first, templates=TEMPLATES)
        theirs = tb.values(ref, tok, requests, flat, first.layers[-1], VALUE, site)
        np.testing.assert_array_equal(np.asarray(ours.steps), theirs.steps)
        agree = {f"values {site} {k}": rel(getattr(ours, k), getattr(theirs, k)) for k in ("init", "delta", "target")}
        for method in methods:
            hp = HPARAMS[method]
            new, report = jaxedit.edit(params, cfg, tok, requests, hp, covariances=C0, templates=TEMPLATES,
                                       values=ours)
            te = tb.edit(ref, tok, requests, hp, covariances=C0, templates=TEMPLATES, given_values=theirs)
            for i, layer in enumerate(hp.layers):
                agree[f"{method} keys L{layer}"] = rel(np.asarray(report.keys[i]).T, te.keys[layer])
                dW = np.asarray(new["layers"]["down_proj"][layer]) - before["layers"]["down_proj"][layer]
                agree[f"{method} dW L{layer}"] = rel(dW, te.deltas[layer])
            assert jaxedit.evaluate(new, cfg, tok, requests).aggregate.es == 100.0, method
            edited[method] = new
        report_lines += [f"{arch} {k}: {v:.2g}" for k, v in agree.items()]
        assert max(agree.values()) <= TOL, agree
    print("\n" + "\n".join(report_lines))
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:  # the input tree is untouched
        np.testing.assert_array_equal(np.asarray(leaf), before[path[0].key] if len(path) == 1
                                      else before[path[0].key][path[1].key])

    # scoring the edited model (packed prefix trees) agrees with transformers' forward on it
    cases = jaxedit.evaluate(edited["memit"], cfg, tok, REQUESTS).cases
    prompts = [(p, r) for r in REQUESTS for p in (r.prompt.format(r.subject),) + r.paraphrase_prompts
               + r.neighborhood_prompts]
    want = tb.score_prompts(tb.torch_model(cfg, edited["memit"], attn_implementation="eager"), tok,
                            [(p, r.target_new, r.target_true) for p, r in prompts])
    got = np.asarray([nll for c in cases for nll in c.rewrite_nll + c.paraphrase_nll + c.neighborhood_nll])
    assert rel(got, want) <= TOL, (got, want)


def test_causal_tracing_runs():
    """On the windowed Mistral model, the one-program trace (lanes over cached prefixes) equals one
    restoration per forward pass. (Biases change nothing in how tracing runs.)"""
    cfg, params, _ = _model("mistral")
    tok = testing.WordTokenizer(VOCAB)
    fact = knowns.KnownFact(7, "Vinson Massif", "Antarctica", "Vinson Massif is located in the continent of")
    encoded = knowns.encode_fact(tok, fact)
    assert len(encoded.tokens) > cfg.sliding_window
    tc = trace.TraceConfig(noise_samples=2, window=2, length_multiple=4, chunk_tokens=64)
    std = trace.embedding_noise_std(params, knowns.subject_token_ids([encoded]))
    got = trace.trace_fact(params, cfg, encoded, 11, std, tc)
    sites = [(0, 0, 1), (1, 1, 2), (2, 2, len(encoded.tokens) - 1), (0, 1, len(encoded.tokens) - 1)]
    naive = trace.naive_trace(params, cfg, encoded, 11, std, tc, sites=sites)
    for site in sites:
        assert got.scores[site] == pytest.approx(naive.scores[site], abs=1e-5)
    assert got.p_corrupt == pytest.approx(naive.p_corrupt, abs=1e-6)
    assert got.p_corrupt != pytest.approx(got.p_clean, abs=1e-4)
