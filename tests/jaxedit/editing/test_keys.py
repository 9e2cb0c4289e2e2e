import jax.numpy as jnp
import numpy as np

from llama3_flax.model import Capture, forward
from jaxedit.editing.keys import keys_at_layers, outputs_at_subject
from jaxedit.requests import EditRequest

GROUPS = (("{}",), ("Once upon a time. {}", "Because of that, {}"))
REQUESTS = [
    EditRequest("{} is a twin city of", "Lyon", "Beijing", case_id="start"),                 # subject first
    EditRequest("The mother tongue of {} is", "Danielle Darrieux", "English", case_id="mid"),  # multi-token
    EditRequest("Famous for the paintings of {}", "Vincent van Gogh", "Picasso", case_id="end"),  # at the end
]


def reference_subject_index(tok, text, subject_end):
    """The last token whose character span starts before the subject's end (offset mapping)."""
    enc = tok(text, return_offsets_mapping=True)
    starts = [s for s, _ in enc["offset_mapping"]]
    return max(i for i, s in enumerate(starts) if s < subject_end and enc["offset_mapping"][i][1] > 0)


def reference_keys(params, cfg, tok, request, groups, layer):
    group_means = []
    for g in groups:
        rows = []
        for t in g:
            text = t.replace("{}", request.prompt).replace("{}", request.subject)
            prefix = t.replace("{}", request.prompt).split("{}")[0]
            idx = reference_subject_index(tok, text, len(prefix) + len(request.subject))
            ids = jnp.asarray([tok(text)["input_ids"]])
            _, c = forward(params, cfg, ids, capture=Capture(jnp.asarray([layer]), jnp.asarray([[idx]])))
            rows.append(np.asarray(c.mlp_in[0, 0, 0]))
        group_means.append(np.mean(rows, axis=0))
    return np.mean(group_means, axis=0)


def test_keys_equal_capture_and_index_reference(tiny_with_tokenizer):
    cfg, params, tok = tiny_with_tokenizer
    keys = np.asarray(keys_at_layers(params, cfg, tok, REQUESTS, GROUPS, [0, 2]))
    assert keys.shape == (2, 3, cfg.intermediate_size)
    for li, layer in enumerate([0, 2]):
        for ri, r in enumerate(REQUESTS):
            ref = reference_keys(params, cfg, tok, r, GROUPS, layer)
            err = np.linalg.norm(keys[li, ri] - ref) / np.linalg.norm(ref)
            assert err < 1e-5, (layer, r.case_id, err)


def test_rome_style_single_group_is_plain_average(tiny_with_tokenizer):
    cfg, params, tok = tiny_with_tokenizer
    flat = (tuple(t for g in GROUPS for t in g),)
    keys = np.asarray(keys_at_layers(params, cfg, tok, REQUESTS[1:2], flat, [1]))[0, 0]
    ref = np.mean([reference_keys(params, cfg, tok, REQUESTS[1], ((t,),), 1) for t in flat[0]], axis=0)
    np.testing.assert_allclose(keys, ref, rtol=1e-5, atol=1e-6)
    grouped = np.asarray(keys_at_layers(params, cfg, tok, REQUESTS[1:2], GROUPS, [1]))[0, 0]
    assert np.linalg.norm(grouped - keys) > 1e-4 * np.linalg.norm(keys)  # the grouping matters


def test_keys_do_not_depend_on_batch_company(tiny_with_tokenizer):
    cfg, params, tok = tiny_with_tokenizer
    together = np.asarray(keys_at_layers(params, cfg, tok, REQUESTS, GROUPS, [1]))[0]
    for i, r in enumerate(REQUESTS):
        alone = np.asarray(keys_at_layers(params, cfg, tok, [r], GROUPS, [1]))[0, 0]
        np.testing.assert_allclose(together[i], alone, rtol=1e-5, atol=1e-6)


def test_outputs_at_subject_are_the_bare_prompt_outputs(tiny_with_tokenizer):
    cfg, params, tok = tiny_with_tokenizer
    mlp_out, resid = outputs_at_subject(params, cfg, tok, REQUESTS, 1)
    for i, r in enumerate(REQUESTS):
        text = r.filled_prompt
        idx = reference_subject_index(tok, text, len(r.prefix) + len(r.subject))
        _, c = forward(params, cfg, jnp.asarray([tok(text)["input_ids"]]),
                       capture=Capture(jnp.asarray([1]), jnp.asarray([[idx]])))
        np.testing.assert_allclose(np.asarray(mlp_out[i]), np.asarray(c.mlp_out[0, 0, 0]), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(np.asarray(resid[i]), np.asarray(c.resid_out[0, 0, 0]), rtol=1e-5, atol=1e-6)
