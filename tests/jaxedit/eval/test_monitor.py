"""The long-run monitor's record on a tiny model, and the collapse guard on constructed cases."""
import jax.numpy as jnp
import pytest

from jaxedit import testing
from jaxedit.eval import general
from jaxedit.eval.monitor import CollapseRule, Monitor, MonitorSpec
from jaxedit.requests import EditRequest

SMALL = MonitorSpec(every=2, tasks=("sst2", "mmlu"), questions=4, heldout_tokens=96, window=32,
                    generation_prompts=2, generation_tokens=4)


def test_monitor_records_and_the_guard_fires_on_a_wrecked_model():
    cfg, params, tok = testing.tiny_model(num_hidden_layers=2)
    monitor = Monitor(params, cfg, tok, edited_layers=(1,), spec=SMALL)
    before = monitor.unedited
    assert before["perplexity_tokens"] == monitor.heldout.n_scored == 93  # 3 windows of 32 (first token context)
    assert before["perplexity"] == pytest.approx(general.perplexity(params, cfg, monitor.heldout), rel=1e-6)
    assert set(before["general"]) == {"sst2", "mmlu"} and before["general_chance"] == pytest.approx(37.5)
    assert before["weight_change"] == {"1": 0.0} and "retention" not in before
    assert before["generation_entropy"] is not None
    rule = CollapseRule()
    assert rule.reason(before, before) is None
    # confidently wrong: the unembedding scaled up makes the held-out text far less likely
    down = params["layers"]["down_proj"]
    wrecked = dict(params, lm_head=params["lm_head"] * 30.0,
                   layers=dict(params["layers"], down_proj=down.at[1].multiply(2.0)))
    case = EditRequest("The mother tongue of {} is", "Danielle Darrieux", "English", target_true="French",
                       paraphrase_prompts=("Danielle Darrieux speaks",), neighborhood_prompts=("Paris speaks",))
    after = monitor.measure(wrecked, [case])
    assert after["weight_change"]["1"] == pytest.approx(1.0, rel=1e-5)
    assert after["retention"]["n_cases"] == 1
    assert rule.reason(before, after).startswith("collapse: perplexity")


def test_collapse_rule_on_records():
    unedited = {"perplexity": 10.0, "general_accuracy": 60.0, "general_chance": 37.5}
    rule = CollapseRule(perplexity_ratio=2.0, accuracy_over_chance=2.0)
    assert rule.reason(unedited, {"perplexity": 19.9, "general_accuracy": 40.0, "general_chance": 37.5}) is None
    assert "perplexity 20.1 > 2 x unedited 10" in rule.reason(unedited, {"perplexity": 20.1, "general_accuracy": 60.0,
                                                                           "general_chance": 37.5})
    assert "accuracy 39.5 <= chance 37.5 + 2" in rule.reason(unedited, {"perplexity": 11.0, "general_accuracy": 39.5,
                                                                         "general_chance": 37.5})
    at_chance = dict(unedited, general_accuracy=38.0)  # unedited at chance: accuracy cannot collapse
    assert rule.reason(at_chance, {"perplexity": 11.0, "general_accuracy": 30.0, "general_chance": 37.5}) is None
    assert CollapseRule(None, None).reason(unedited, {"perplexity": 1e9, "general_accuracy": 0.0,
                                                      "general_chance": 50.0}) is None
    with pytest.raises(ValueError, match="unknown tasks"):
        MonitorSpec(tasks=("glue",))
