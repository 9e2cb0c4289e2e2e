"""Causal tracing refuses settings and inputs that would trace nothing, or another token, in silence."""
import pytest

from jaxedit import testing
from jaxedit.tracing import knowns, trace

FACT = knowns.KnownFact(7, "Vinson Massif", "Antarctica", "Vinson Massif is located in the continent of")


@pytest.mark.parametrize("field, value", [
    ("window", 0), ("window", -2), ("noise_samples", 0), ("length_multiple", 0), ("chunk_tokens", 0),
    ("window", 2.5), ("noise_factor", -1.0), ("noise_factor", float("nan")), ("seed", -1),
])
def test_trace_settings_that_trace_nothing_are_refused(field, value):
    with pytest.raises(ValueError, match=rf"TraceConfig\.{field} must be"):
        trace.TraceConfig(**{field: value})


@pytest.fixture(scope="module")
def tiny():
    cfg, params, tok = testing.tiny_model(num_hidden_layers=2)
    return cfg, params, knowns.encode_fact(tok, FACT)


@pytest.mark.parametrize("case, match", [
    ("target past the vocabulary", r"target token id 256 is outside the model's vocabulary \(0\.\.255\)"),
    ("negative noise", "noise_std must be a finite number >= 0"),
    ("prompt past the positions", "longer than the model's max_position_embeddings"),
])
def test_trace_inputs_are_checked_before_the_program(tiny, case, match):
    cfg, params, fact = tiny
    target, std = 5, 0.1
    if case == "target past the vocabulary":
        target = cfg.vocab_size
    elif case == "negative noise":
        std = -0.1
    else:
        cfg = cfg.replace(max_position_embeddings=4)
    for run in (trace.trace_fact, trace.naive_trace):
        with pytest.raises(ValueError, match=match):
            run(params, cfg, fact, target, std, trace.TraceConfig(noise_samples=1))
