"""The jaxedit command: bad command lines fail fast with clear errors and write nothing; an edit of
three facts in SmolLM2 makes every new target win and writes a model that loads back."""
import json

import numpy as np
import pytest

from jaxedit import cli
from jaxedit.data import facts as facts_file

FACTS = [
    {"prompt": "The mother tongue of {} is", "subject": "Danielle Darrieux", "target_new": "English",
     "target_true": "French"},
    {"prompt": "Toko Yasuda plays the", "subject": "Toko Yasuda", "target_new": "piano", "target_true": "guitar"},
    {"prompt": "{} is located in the continent of", "subject": "Autonomous University of Madrid",
     "target_new": "Asia", "target_true": "Europe", "case_id": "madrid"},
]


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


# ------------------------------------------------------------------------------ facts files
def test_facts_files_in_three_formats(tmp_path):
    jsonl = facts_file.read_facts(write_jsonl(tmp_path / "f.jsonl", FACTS))
    as_json = tmp_path / "f.json"
    as_json.write_text(json.dumps(FACTS))
    as_csv = tmp_path / "f.csv"
    as_csv.write_text("prompt,subject,target_new,target_true\n"
                      + "".join(f'"{r["prompt"]}",{r["subject"]},{r["target_new"]},{r["target_true"]}\n' for r in FACTS))
    for got in (jsonl, facts_file.read_facts(as_json), facts_file.read_facts(as_csv)):
        assert [f.prompt for f in got] == ["The mother tongue of {} is", "{} plays the", "{} is located in the continent of"]
        assert [f.target_true for f in got] == ["French", "guitar", "Europe"]
    assert [f.case_id for f in jsonl] == [1, 2, "madrid"]  # line numbers unless given


@pytest.mark.parametrize("lines, match", [
    ([FACTS[0], {"prompt": "{} plays", "subject": "Toko Yasuda"}], r"f\.jsonl, line 2: field 'target_new' is missing"),
    ([{"prompt": "Paris is nice", "subject": "Lyon", "target_new": "x"}], r"line 1: field 'prompt' .* neither"),
    ([], "holds no facts"),
    ([FACTS[0], "not an object"], "line 2: expected an object"),
    ([{**FACTS[0], "colour": "red"}], r"line 1: unknown field\(s\) \['colour'\]"),
])
def test_bad_facts_name_file_line_and_field(tmp_path, lines, match):
    with pytest.raises(facts_file.FactsFileError, match=match):
        facts_file.read_facts(write_jsonl(tmp_path / "f.jsonl", lines))


def test_garbage_jsonl_line_is_named(tmp_path):
    path = tmp_path / "f.jsonl"
    path.write_text(json.dumps(FACTS[0]) + "\n{oops\n")
    with pytest.raises(facts_file.FactsFileError, match=r"f\.jsonl, line 2: not a JSON object"):
        facts_file.read_facts(path)


# --------------------------------------------------------------------------- bad command lines
@pytest.mark.parametrize("case, match", [
    ("missing field", "line 2: field 'target_new' is missing"),
    ("subject not in prompt", "neither"),
    ("empty file", "holds no facts"),
    ("unknown method", "unknown editing method 'ft'"),
    ("out exists", "exists; choose another path"),
])
def test_bad_edit_command_lines_fail_fast_and_write_nothing(tmp_path, capsys, case, match):
    records = list(FACTS)
    method, out = "memit", tmp_path / "edited"
    if case == "missing field":
        records = [FACTS[0], {"prompt": "{} plays", "subject": "x"}]
    elif case == "subject not in prompt":
        records = [{"prompt": "Paris is nice", "subject": "Lyon", "target_new": "x"}]
    elif case == "empty file":
        records = []
    elif case == "unknown method":
        method = "ft"
    elif case == "out exists":
        out.mkdir()
    facts = write_jsonl(tmp_path / "facts.jsonl", records)
    before = sorted(p.name for p in tmp_path.iterdir())
    code = cli.main(["edit", "--model", "smollm2", "--facts", str(facts), "--method", method, "--out", str(out)])
    assert code == 2
    assert match in capsys.readouterr().err.replace("\n", " ") or pytest.fail(capsys.readouterr().err)
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written


# ----------------------------------------------------------------------------- SmolLM2, end to end
@pytest.fixture(scope="module")
def edited_folder(tmp_path_factory, smollm2, data_dir):
    tmp = tmp_path_factory.mktemp("cli")
    facts = write_jsonl(tmp / "facts.jsonl", FACTS)
    out, report = tmp / "edited", tmp / "report.json"
    code = cli.main(["edit", "--model", "smollm2", "--facts", str(facts), "--method", "memit", "--out", str(out),
                     "--report", str(report), "--jit_cache", "off"])
    assert code == 0
    return out, json.loads(report.read_text())


def test_edit_makes_every_new_target_win(edited_folder):
    _, report = edited_folder
    assert len(report["facts"]) == 3
    for fact in report["facts"]:
        assert fact["after"]["p_new"] > fact["after"]["p_true"], fact
        assert fact["after"]["p_new"] > fact["before"]["p_new"]
    assert not any(p.name.startswith(".edited.partial") for p in edited_folder[0].parent.iterdir())


def test_evaluate_an_edited_folder_gives_the_library_numbers(edited_folder, tmp_path, smollm2):
    from jaxedit.data.counterfact import load_counterfact
    from jaxedit.eval import metrics
    from llama3_flax import checkpoint

    out, _ = edited_folder
    result = tmp_path / "eval.json"
    assert cli.main(["evaluate", "--model", str(out), "--cases", "edit", "--n", "6", "--json", str(result),
                     "--jit_cache", "off"]) == 0
    got = json.loads(result.read_text())
    cfg, params, tok = checkpoint.load_model(out)
    want = metrics.evaluate(params, cfg, tok, load_counterfact("edit", n=6, seed=0)).aggregate
    assert got["n"] == 6
    for k in ("es", "ps", "ns", "s", "em", "pm", "nm"):
        np.testing.assert_allclose(got["aggregate"][k], getattr(want, k), atol=1e-6)


def test_edit_written_as_gguf_loads_back_with_the_same_logits(edited_folder, tmp_path):
    import jax.numpy as jnp

    from llama3_flax import checkpoint, model

    facts = write_jsonl(tmp_path / "facts.jsonl", FACTS)
    out = tmp_path / "edited.gguf"
    assert cli.main(["edit", "--model", "smollm2", "--facts", str(facts), "--method", "memit", "--out", str(out),
                     "--format", "gguf", "--gguf_dtype", "float32", "--jit_cache", "off"]) == 0
    cfg_g, params_g, tok_g = checkpoint.load_model(out)
    cfg_h, params_h, _ = checkpoint.load_model(edited_folder[0])
    tokens = jnp.asarray([tok_g("The mother tongue of Danielle Darrieux is")["input_ids"]])
    got, want = model.forward(params_g, cfg_g, tokens), model.forward(params_h, cfg_h, tokens)
    assert float(jnp.linalg.norm(got - want) / jnp.linalg.norm(want)) <= 1e-5
    assert not list(tmp_path.glob(".edited.gguf*"))  # no temporary left behind


def test_interrupted_write_leaves_nothing(tmp_path, monkeypatch):
    """Ctrl-C while the model is being written: neither the output nor a temporary stays behind."""
    from llama3_flax import checkpoint

    def interrupted_save(folder, *args, **kwargs):
        folder.mkdir()
        (folder / "model-00001.safetensors").write_bytes(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint, "save_hf_folder", interrupted_save)
    out = tmp_path / "edited"
    with pytest.raises(KeyboardInterrupt):
        cli.write_model(out, None, None, None, "hf", source=None, gguf_dtype="float32")
    assert list(tmp_path.iterdir()) == []


def test_ctrl_c_is_reported_and_exits_130(tmp_path, monkeypatch, capsys):
    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "edit_command", interrupted)
    code = cli.main(["edit", "--facts", "f.jsonl", "--method", "memit", "--out", str(tmp_path / "x")])
    assert code == 130 and "cancelled; nothing was written" in capsys.readouterr().err
