"""Capture and injection sites against PyTorch hooks; layers as data; residual_before + run_layers."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llama3_flax import config, model

from .reference import padded_batch, rel_err, rope_position_ids, torch_logits, torch_model

TOL = 1e-5
N_LAYERS = 4


@pytest.fixture(scope="module")
def setup():
    cfg = config.tiny(num_hidden_layers=N_LAYERS, rope_scaling=config.RopeScaling(8.0, 1.0, 4.0, 32))
    params = model.init_params(cfg, jax.random.PRNGKey(3), std=0.1)
    tokens, mask = padded_batch(np.random.default_rng(0), [20, 13, 6], cfg.vocab_size, "left")
    return cfg, params, tokens, mask, torch_model(cfg, params)


def _torch_down_proj_io(ref, tokens, mask):
    """Per layer, the down_proj input and output recorded by PyTorch forward hooks: lists of (B, T, ·)."""
    ins, outs, handles = {}, {}, []
    for i, layer in enumerate(ref.model.layers):
        def hook(module, args, output, i=i):
            ins[i], outs[i] = args[0].detach().numpy().copy(), output.detach().numpy().copy()
        handles.append(layer.mlp.down_proj.register_forward_hook(hook))
    try:
        logits, hidden = torch_logits(ref, tokens, mask, output_hidden_states=True)
    finally:
        for h in handles:
            h.remove()
    return [ins[i] for i in range(len(ins))], [outs[i] for i in range(len(outs))], logits, hidden


def _positions(mask, per_row):
    """(B, P) capture slots: the last `per_row` real slots of each (left-padded) row, in any order."""
    t = mask.shape[1]
    return np.stack([np.array([t - 1 - j for j in range(per_row)][::-1]) for _ in range(len(mask))]).astype(np.int32)


def test_captured_activations_match_torch_hooks(setup):
    cfg, params, tokens, mask, ref = setup
    layers = np.array([2, 0, 3], np.int32)  # unordered, includes the last layer
    positions = np.array([[19, 3, 10], [19, 18, 7], [14, 19, 17]], np.int32)  # all real slots
    assert mask[np.arange(3)[:, None], positions].all()
    logits, cap = model.forward(params, cfg, jnp.asarray(tokens), jnp.asarray(mask),
                                capture=model.Capture(layers=jnp.asarray(layers), positions=jnp.asarray(positions)))
    ins, outs, want_logits, hidden = _torch_down_proj_io(ref, tokens, mask)
    assert rel_err(logits, want_logits, mask) <= TOL
    b = np.arange(3)[:, None]
    assert cap.mlp_in.shape == (3, 3, 3, cfg.intermediate_size)
    assert cap.mlp_out.shape == cap.resid_out.shape == (3, 3, 3, cfg.hidden_size)
    for j, layer in enumerate(layers):
        assert rel_err(cap.mlp_in[j], ins[layer][b, positions]) <= TOL, layer
        assert rel_err(cap.mlp_out[j], outs[layer][b, positions]) <= TOL, layer
        if layer < cfg.num_hidden_layers - 1:
            assert rel_err(cap.resid_out[j], hidden[layer + 1][b, positions]) <= TOL, layer
        else:  # transformers' last hidden state is after the final norm
            normed = model.final_hidden(params, cfg, cap.resid_out[j])
            assert rel_err(normed, hidden[layer + 1][b, positions]) <= TOL


def test_captured_residuals_all_layers_all_slots(setup):
    cfg, params, tokens, mask, ref = setup
    t = tokens.shape[1]
    capture = model.Capture(layers=jnp.arange(N_LAYERS - 1), positions=jnp.broadcast_to(jnp.arange(t), tokens.shape))
    _, cap = model.forward(params, cfg, jnp.asarray(tokens), jnp.asarray(mask), capture=capture)
    _, _, _, hidden = _torch_down_proj_io(ref, tokens, mask)
    for layer in range(N_LAYERS - 1):
        assert rel_err(cap.resid_out[layer], hidden[layer + 1], mask) <= TOL, layer


def _torch_injected_logits(ref, tokens, mask, layer, positions, delta):
    """Logits with delta added to the output of decoder layer `layer` at slots `positions` via a torch hook."""
    import torch

    def hook(module, args, output):
        h = output[0] if isinstance(output, tuple) else output
        h = h.clone()
        for b in range(h.shape[0]):
            for j, p in enumerate(positions[b]):
                if p >= 0:
                    h[b, p] += torch.from_numpy(delta[b, j])
        return (h, *output[1:]) if isinstance(output, tuple) else h

    handle = ref.model.layers[layer].register_forward_hook(hook)
    try:
        return torch_logits(ref, tokens, mask)
    finally:
        handle.remove()


def _inject(cfg, params, tokens, mask, layer, positions, delta):
    inj = model.Injection(layer=jnp.asarray(layer, jnp.int32), positions=jnp.asarray(positions, jnp.int32),
                          delta=jnp.asarray(delta, jnp.float32))
    return np.asarray(model.forward(params, cfg, jnp.asarray(tokens), jnp.asarray(mask), inject=inj))


def test_zero_injection_changes_nothing(setup):
    cfg, params, tokens, mask, _ = setup
    base = np.asarray(model.forward(params, cfg, jnp.asarray(tokens), jnp.asarray(mask)))
    got = _inject(cfg, params, tokens, mask, 1, _positions(mask, 2), np.zeros((3, 2, cfg.hidden_size)))
    np.testing.assert_allclose(got, base, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("layer", [0, 2])
def test_injection_is_causal_and_matches_torch_hook(setup, layer):
    cfg, params, tokens, mask, ref = setup
    t = tokens.shape[1]
    rng = np.random.default_rng(layer)
    p = np.array([[12], [15], [-1]], np.int32)  # the third row gets no injection (slot < 0)
    delta = rng.normal(size=(3, 1, cfg.hidden_size)).astype(np.float32)
    base = np.asarray(model.forward(params, cfg, jnp.asarray(tokens), jnp.asarray(mask)))
    got = _inject(cfg, params, tokens, mask, layer, p, delta)
    assert rel_err(got, _torch_injected_logits(ref, tokens, mask, layer, p, delta), mask) <= TOL
    # (B, T) over real slots only: left-padding slots see no key and are not meaningful
    change = np.where(mask == 1, np.abs(got - base).max(axis=-1), np.nan)
    for b in range(2):
        assert t - mask[b].sum() < p[b, 0]
        assert np.nanmax(change[b, : p[b, 0]]) <= 1e-5, "an injection changed an earlier slot"
        assert (change[b, p[b, 0]:] > 1e-3).all(), "an injection left a later slot unchanged"
    assert np.nanmax(change[2]) <= 1e-5


def test_injection_at_last_layer_only_changes_its_slot(setup):
    cfg, params, tokens, mask, _ = setup
    p = np.array([[12], [15], [17]], np.int32)
    delta = np.random.default_rng(7).normal(size=(3, 1, cfg.hidden_size)).astype(np.float32)
    base = np.asarray(model.forward(params, cfg, jnp.asarray(tokens), jnp.asarray(mask)))
    changed = np.abs(_inject(cfg, params, tokens, mask, N_LAYERS - 1, p, delta) - base).max(-1) > 1e-4
    changed &= mask == 1  # left-padding slots see no key and are not meaningful
    expected = np.zeros_like(changed)
    expected[np.arange(3), p[:, 0]] = True
    np.testing.assert_array_equal(changed, expected)


def test_layer_indices_are_data_not_compile_constants(setup):
    cfg, params, tokens, mask, _ = setup
    tokens, mask = jnp.asarray(tokens), jnp.asarray(mask)
    traces = []

    @jax.jit
    def capture_at(params, layers, inject_layer):
        traces.append(1)  # runs once per trace
        inj = model.Injection(layer=inject_layer, positions=jnp.full((3, 1), 12, jnp.int32),
                              delta=jnp.ones((3, 1, cfg.hidden_size)))
        return model.forward(params, cfg, tokens, mask, inject=inj,
                             capture=model.Capture(layers=layers, positions=jnp.full((3, 2), 19, jnp.int32)))[1]

    results = [capture_at(params, jnp.array([i, i + 1], jnp.int32), jnp.int32(i)) for i in range(3)]
    assert len(traces) == 1
    assert capture_at._cache_size() == 1
    assert not np.allclose(results[0].mlp_in, results[1].mlp_in)  # different layers were really read

    # model.forward's own cache: new capture layers or injection layer reuse its compilation.
    pos = jnp.full((3, 2), 19, jnp.int32)
    model.forward(params, cfg, tokens, mask, capture=model.Capture(layers=jnp.array([0]), positions=pos))
    size = model.forward._cache_size()
    for layer in (1, 3):
        model.forward(params, cfg, tokens, mask, capture=model.Capture(layers=jnp.array([layer]), positions=pos))
    assert model.forward._cache_size() == size
    model.residual_before(params, cfg, tokens, mask, 1)
    size = model.residual_before._cache_size()
    model.residual_before(params, cfg, tokens, mask, 3)
    assert model.residual_before._cache_size() == size


@pytest.mark.parametrize("layer", range(N_LAYERS + 1))
def test_residual_before_then_run_layers_is_the_full_forward(setup, layer):
    cfg, params, tokens, mask, ref = setup
    tokens, mask_j = jnp.asarray(tokens), jnp.asarray(mask)
    h = model.residual_before(params, cfg, tokens, mask_j, layer)
    _, hidden = torch_logits(ref, np.asarray(tokens), mask, output_hidden_states=True)
    if layer < N_LAYERS:  # the residual stream entering `layer` is transformers' hidden_states[layer]
        assert rel_err(h, hidden[layer], mask) <= TOL
    out, _ = model.run_layers(params, cfg, h, mask_j, first_layer=layer)
    full = model.forward(params, cfg, tokens, mask_j)
    assert rel_err(model.logits_from_hidden(params, cfg, out), full, mask) <= TOL


def test_run_layers_range_and_capture_from_a_middle_layer(setup):
    cfg, params, tokens, mask, _ = setup
    tokens, mask = jnp.asarray(tokens), jnp.asarray(mask)
    positions = jnp.full((3, 1), 19, jnp.int32)
    _, full_cap = model.forward(params, cfg, tokens, mask,
                                capture=model.Capture(layers=jnp.arange(N_LAYERS), positions=positions))
    h1 = model.residual_before(params, cfg, tokens, mask, 1)
    h3 = model.residual_before(params, cfg, tokens, mask, 3)
    mid, cap = model.run_layers(params, cfg, h1, mask, first_layer=1, last_layer=2,
                                capture=model.Capture(layers=jnp.array([1, 2]), positions=positions))
    assert rel_err(mid, h3, mask[..., None].repeat(cfg.hidden_size, -1)) <= TOL
    assert rel_err(cap.mlp_in, full_cap.mlp_in[1:3]) <= TOL
    assert rel_err(cap.resid_out, full_cap.resid_out[1:3]) <= TOL
    assert rope_position_ids(np.asarray(mask))[2, -1] == 5
