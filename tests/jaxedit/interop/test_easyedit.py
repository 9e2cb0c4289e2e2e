"""The EasyEdit-style front door: EasyEdit's hparams files and edit arguments, jaxedit's edits and metrics."""
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml

import jaxedit
from jaxedit import testing
from jaxedit.editing import tokenize
from jaxedit.interop import easyedit, hparams_files
from jaxedit.interop.easyedit import BaseEditor
from llama3_flax import model as lm_model
from llama3_flax.config import LlamaConfig, llama3_8b

FIXTURES = Path(__file__).parent / "fixtures" / "easyedit"
CONFIGS = {  # the published models' shapes
    "llama3-8b": llama3_8b(),
    "qwen2.5-7b": LlamaConfig(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                              num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=32768),
    "mistral-7b": LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                              num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=32768),
}
TEMPLATES = (("{}",), ("The day . {}", "Once upon a time . {}"))
# EasyEdit's arguments for two CounterFact-like cases (its counterfact-edit.json layout). Both have the same
# token counts (a word-level tokenizer), so their value optimisations share one compiled program.
ARGS = dict(
    prompts=["The mother tongue of Danielle Darrieux is", "The mother tongue of Michel Rocard is"],
    ground_truth=["French", "French"],
    target_new=["English", "German"],
    subject=["Danielle Darrieux", "Michel Rocard"],
    rephrase_prompts=["Where Danielle Darrieux is from , people speak the language of",
                      "Michel Rocard was born speaking"],
    locality_inputs={"neighborhood": {"prompt": ["Michel Rocard is a native speaker of", "Lyon is a city in"],
                                      "ground_truth": ["French", "France"]}},
    portability_inputs={"one_hop": {"prompt": ["The language of Danielle Darrieux 's films is", None],
                                    "ground_truth": ["English", None]}},
)
REQUESTS = [jaxedit.EditRequest("The mother tongue of {} is", "Danielle Darrieux", "English", "French", case_id=0),
            jaxedit.EditRequest("The mother tongue of {} is", "Michel Rocard", "German", "French", case_id=1)]


def first_case(args: dict) -> dict:
    """EasyEdit's arguments for the first case alone."""
    out = {}
    for k, v in args.items():
        out[k] = {key: {f: vals[:1] for f, vals in item.items()} for key, item in v.items()} if isinstance(v, dict) \
            else v[:1]
    return out


def tiny_hparams(folder: str, **changes) -> dict:
    """An EasyEdit fixture's fields, with its layers and steps made for the tiny 4-layer model."""
    data = yaml.safe_load((FIXTURES / folder / "llama3-8b.yaml").read_text())
    return {**data, "layers": [1], "v_loss_layer": 3, "v_num_grad_steps": 3, **changes}


@pytest.fixture(scope="module")
def tiny():
    cfg, params, tok = testing.tiny_model()
    rng = np.random.RandomState(0)
    a = rng.randn(cfg.intermediate_size, 4 * cfg.intermediate_size)
    c0 = jnp.asarray(a @ a.T / a.shape[1] + 0.1 * np.eye(cfg.intermediate_size), jnp.float32)
    return cfg, params, tok, {1: c0}


@pytest.fixture(scope="module")
def editor(tiny):
    cfg, params, tok, covs = tiny
    return BaseEditor.from_hparams(tiny_hparams("MEMIT"), (cfg, params, tok), covariances=covs, templates=TEMPLATES)


@pytest.fixture(scope="module")
def one_edit(editor):
    """The first case edited alone (sequential_edit=False)."""
    return editor.edit(**first_case(ARGS), verbose=False)


@pytest.fixture(scope="module")
def sequential(editor):
    """Both cases, one after the other (sequential_edit=True)."""
    return editor.edit(**ARGS, sequential_edit=True, verbose=False)


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)


def assert_trees_close(a, b, tol=1e-6):
    for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(a)[0], jax.tree_util.tree_leaves(b)):
        assert rel(x, y) <= tol, jax.tree_util.keystr(path)


def test_front_door_gives_the_params_of_jaxedit_edit(tiny, editor, one_edit):
    cfg, params, tok, covs = tiny
    hp = editor.hparams  # the file's settings (EditHparams' defaults for what it leaves out: no preset knows this model)
    assert (hp.method, hp.layers, hp.mom2_update_weight, hp.value.v_lr, hp.value.clamp_norm_factor) == \
        ("memit", (1,), 15000.0, 0.5, 4.0)
    _, edited = one_edit
    reference, _ = jaxedit.edit(params, cfg, tok, REQUESTS[:1], hp, covariances=covs, templates=TEMPLATES)
    # two calls of the same program: equal to 1e-6 relative (no exact float comparison between calls)
    assert_trees_close(edited, reference, 1e-6)
    assert rel(edited["layers"]["down_proj"][1], params["layers"]["down_proj"][1]) > 1e-4  # it did edit
    assert editor.params is params  # the editor's model is the unedited one


def test_sequential_front_door_gives_the_params_of_jaxedit_sequential_edit(tiny, editor, one_edit, sequential):
    cfg, params, tok, covs = tiny
    metrics, edited = sequential
    reference, _ = jaxedit.sequential_edit(params, cfg, tok, REQUESTS, editor.hparams, covariances=covs,
                                           templates=TEMPLATES, progress=False)
    assert_trees_close(edited, reference, 1e-6)
    # "post" right after each case's own edit (EasyEdit's): case 0's is the model with case 0 alone edited;
    # "post_final" after both edits
    assert all({"post", "post_final"} <= set(m) for m in metrics)
    alone = one_edit[0][0]["post"]
    case = REQUESTS[0].__class__(**{**vars(REQUESTS[0]), "paraphrase_prompts": (ARGS["rephrase_prompts"][0],)})
    [final] = jaxedit.evaluate(edited, cfg, tok, [case], progress=False).cases
    for k in ("es", "ps", "em", "pm"):
        assert metrics[0]["post"][f"counterfact_{k}"] == pytest.approx(alone[f"counterfact_{k}"], rel=1e-5, abs=1e-9)
        assert metrics[0]["post_final"][f"counterfact_{k}"] == pytest.approx(getattr(final, k) / 100, rel=1e-5, abs=1e-9)
    assert metrics[0]["post"]["rewrite_acc"] == alone["rewrite_acc"]


def test_rome_files_give_an_identity_c0_and_one_case_per_edit(tiny):
    cfg, params, tok, _ = tiny
    # EasyEdit's ROME files say mom2_adjustment: false, so the front door's C0 is the identity (no corpus read)
    editor = BaseEditor.from_hparams(tiny_hparams("ROME"), (cfg, params, tok), templates=TEMPLATES)
    assert editor.hparams.covariance.identity and editor.alg_name == "ROME"
    np.testing.assert_array_equal(np.asarray(editor.covariances[1]), np.eye(cfg.intermediate_size))
    with pytest.raises(ValueError, match="ROME edits one case at a time: pass sequential_edit=True"):
        editor.edit(**ARGS)


def test_metric_layout_has_easyedits_keys_and_both_definitions(tiny, one_edit, sequential):
    cfg, params, tok, _ = tiny
    metrics, edited = one_edit
    first = metrics[0]
    assert set(first) == {"case_id", "requested_rewrite", "time", "pre", "post"} and first["case_id"] == 0
    assert first["requested_rewrite"]["locality"] == {"neighborhood": {"prompt": ["Michel Rocard is a native speaker of"],
                                                                       "ground_truth": ["French"]}}
    for phase in ("pre", "post"):
        m = first[phase]
        assert {"rewrite_acc", "rephrase_acc", "locality", "portability", "metric_meta"} <= set(m)
        assert {f"counterfact_{k}" for k in ("es", "ps", "ns", "em", "pm", "nm")} <= set(m)
        assert len(m["rewrite_acc"]) == 1 and 0.0 <= m["rewrite_acc"][0] <= 1.0
        assert m["metric_meta"]["easyedit"]["scorer"] == "token_accuracy"
        assert m["metric_meta"]["counterfact"]["protocol"] == "probability_comparison"
        assert "one_hop_acc" in m["portability"]
    assert "neighborhood_acc" in first["post"]["locality"] and "neighborhood_acc" not in first["pre"]["locality"]
    second = sequential[0][1]
    assert second["case_id"] == 1 and "one_hop_acc" not in second["pre"]["portability"]  # its prompt was None
    # CounterFact's NS only reads locality prompts whose ground truth is the case's ("France" is not "French")
    assert "counterfact_ns" not in second["pre"] and "counterfact_es" in second["pre"]
    # EasyEdit's token accuracy, against a naive forward of each prompt + target alone
    naive = lambda p, prompt, target: _naive_argmax(p, cfg, tok, prompt, target)
    for phase, p in (("pre", params), ("post", edited)):
        predicted, target_ids = naive(p, ARGS["prompts"][0], "English")
        assert first[phase]["rewrite_acc"] == [float(np.mean(predicted == target_ids))]
        predicted, _ = naive(p, "Michel Rocard is a native speaker of", "French")
        assert first[phase]["locality"]["neighborhood_output"] == [predicted.tolist()]
    pre_out, post_out = (first[ph]["locality"]["neighborhood_output"][0] for ph in ("pre", "post"))
    assert first["post"]["locality"]["neighborhood_acc"] == [float(np.mean(np.equal(pre_out, post_out)))]
    # CounterFact's probability comparison, as jaxedit.evaluate gives it (percent there, fractions here)
    case = REQUESTS[0].__class__(**{**vars(REQUESTS[0]), "paraphrase_prompts": (ARGS["rephrase_prompts"][0],),
                                    "neighborhood_prompts": ("Michel Rocard is a native speaker of",)})
    [after] = jaxedit.evaluate(edited, cfg, tok, [case], progress=False).cases
    for k in ("es", "ps", "ns", "em", "pm", "nm"):
        assert first["post"][f"counterfact_{k}"] == pytest.approx(getattr(after, k) / 100.0, abs=1e-9)
    summary = easyedit.summary(sequential[0])
    assert summary["post"]["rewrite_acc"] == pytest.approx(np.mean([m["post"]["rewrite_acc"][0] for m in sequential[0]]))
    assert set(summary["post"]["locality"]) == {"neighborhood_acc"}


def _naive_argmax(params, cfg, tok, prompt, target):
    ids, target_ids = tokenize.encode_prompt(tok, prompt), tokenize.encode_target(tok, target)
    logits = lm_model.forward(params, cfg, jnp.asarray([ids + target_ids]))
    return np.argmax(np.asarray(logits[0, len(ids) - 1:-1]), axis=-1), np.asarray(target_ids)


@pytest.mark.parametrize("folder", ["MEMIT", "ROME", "EMMET", "AlphaEdit"])
@pytest.mark.parametrize("model", list(CONFIGS))
def test_front_door_reads_easyedits_files_for_the_three_models(folder, model):
    cfg = CONFIGS[model]
    editor = BaseEditor.from_hparams(FIXTURES / folder / f"{model}.yaml", (cfg, None, None), covariances={},
                                     templates=TEMPLATES)  # nothing computed: the model is a shape here
    read = hparams_files.read_hparams(FIXTURES / folder / f"{model}.yaml", cfg=cfg,
                                      base=jaxedit.hparams.preset(model, folder.lower()))
    assert editor.hparams == read and editor.alg_name == folder
    if model != "llama3-8b":  # Qwen2.5-7B and Mistral-7B: the file is the preset
        assert editor.hparams == jaxedit.hparams.preset(model, folder.lower())


def test_front_door_computes_c0_and_templates_once_and_then_reads_jaxedits_caches(tiny, corpus_file, tmp_path,
                                                                                 monkeypatch):
    from jaxedit.editing import covariance, templates

    cfg, params, tok, _ = tiny
    calls = {"corpus passes": 0, "generations": 0}
    real_pass = covariance._corpus_pass

    def counted_pass(*args, **kwargs):
        calls["corpus passes"] += 1
        return real_pass(*args, **kwargs)

    def generated(params, cfg, tokenizer, spec):  # stands in for sampling from the model (tested elsewhere)
        calls["generations"] += 1
        return (("{}",),) + tuple(tuple(f"Text {length} {i} . {{}}" for i in range(n)) for length, n in spec.groups)

    monkeypatch.setattr(covariance, "_corpus_pass", counted_pass)
    monkeypatch.setattr(templates, "generate_context_templates", generated)
    hp = tiny_hparams("MEMIT", mom2_n_samples=8)
    first = BaseEditor.from_hparams(hp, (cfg, params, tok), corpus=corpus_file, cache_dir=tmp_path, progress=False)
    again = BaseEditor.from_hparams(hp, (cfg, params, tok), corpus=corpus_file, cache_dir=tmp_path, progress=False)
    assert calls == {"corpus passes": 1, "generations": 1}  # the second editor read both caches
    spec = first.hparams.covariance.__class__(**{**vars(first.hparams.covariance), "corpus": str(corpus_file)})
    c0 = jaxedit.preservation_covariance(params, cfg, tok, [1], spec, cache_dir=tmp_path / "cov", progress=False)
    assert calls["corpus passes"] == 1  # jaxedit's own call finds the front door's cache entry
    assert rel(first.covariances[1], c0[1]) <= 1e-6 and rel(again.covariances[1], c0[1]) <= 1e-6
    assert first.templates == again.templates == generated(params, cfg, tok, first.hparams.templates)


def _with(**changes):
    return {**ARGS, **changes}


@pytest.mark.parametrize("args, match", [
    (_with(target_new=["English"]), r"target_new has 1 entries for 2 prompt\(s\)"),
    (_with(ground_truth=["French", "Manchester", "x"]), r"ground_truth has 3 entries"),
    (_with(subject=["Lyon"]), r"subject has 1 entries"),
    (_with(rephrase_prompts=["a"]), r"rephrase_prompts has 1 entries"),
    (_with(locality_inputs={"neighborhood": {"prompt": ["a"], "ground_truth": ["b"]}}),
     r"locality_inputs\['neighborhood'\]\['prompt'\] has 1 entries"),
    (_with(locality_inputs={"neighborhood": {"prompt": ["a", "b"], "ground_truth": ["c"]}}),
     r"locality_inputs\['neighborhood'\]\['ground_truth'\] has 1 entries"),
    (_with(portability_inputs={"one_hop": {"prompt": ["a", "b"]}}), r"portability_inputs\['one_hop'\] must be"),
    (_with(subject=None), "subject is required"),
    (_with(subject=["Danielle Darrieux", "Paris"]), r"subject\[1\] 'Paris' is not in prompts\[1\]"),
])
def test_bad_easyedit_arguments_are_named(editor, args, match):
    with pytest.raises(ValueError, match=match):
        editor.edit(**args)


def test_arguments_jaxedit_does_not_implement_are_refused(editor):
    for extra, match in (({"target_neg": ["x", "y"]}, "target_neg"), ({"test_generation": True}, "test_generation"),
                         ({"loc_prompts": ["x"]}, "loc_prompts")):
        with pytest.raises(TypeError, match=match):
            editor.edit(**ARGS, **extra)


@pytest.mark.parametrize("change, error, match", [
    ({"alg_name": "FT"}, hparams_files.UnsupportedHparams, "alg_name='FT'"),
    ({"alg_name": None}, ValueError, "no alg_name"),
])
def test_bad_hparams_files_are_named(tiny, tmp_path, change, error, match):
    cfg, params, tok, covs = tiny
    data = {k: v for k, v in {**tiny_hparams("MEMIT"), **change}.items() if v is not None}
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(error, match=match):
        BaseEditor.from_hparams(path, (cfg, params, tok), covariances=covs, templates=TEMPLATES)
