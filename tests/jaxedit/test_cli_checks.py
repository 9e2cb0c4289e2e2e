"""The jaxedit command as a researcher who mistypes meets it: every bad flag, file, name or location is
refused in one line naming it, before the model loads (or, for what needs the model's config, before
C0), and nothing is left behind. No real model is loaded here: load_model is replaced."""
import fcntl
import json
import os

import pytest

from jaxedit import cli, testing
from jaxedit.editing import covariance
from llama3_flax import checkpoint

FACT = {"prompt": "The mother tongue of {} is", "subject": "Danielle Darrieux", "target_new": "English",
        "target_true": "French"}


class ModelLoaded(BaseException):  # not an Exception: the command does not turn it into an error line
    """Raised by the stand-in load_model: the command got as far as loading the model."""


@pytest.fixture
def facts(tmp_path):
    path = tmp_path / "facts.jsonl"
    path.write_text(json.dumps(FACT) + "\n")
    return path


@pytest.fixture
def no_model(monkeypatch):
    def refuse(source, *args, **kwargs):
        raise ModelLoaded(str(source))
    monkeypatch.setattr(checkpoint, "load_model", refuse)


@pytest.fixture
def tiny_model_no_c0(monkeypatch):
    """load_model gives a 4-layer tiny model; computing C0 fails the test."""
    monkeypatch.setattr(checkpoint, "load_model", lambda source, *a, **k: testing.tiny_model(num_hidden_layers=4))

    def refuse(*a, **k):
        raise AssertionError("C0 was computed before the check")
    monkeypatch.setattr(covariance, "preservation_covariance", refuse)


def run(capsys, *argv):
    """(exit status, stderr as one string); asserts the error is one line."""
    try:
        code = cli.main(list(argv))
    except ModelLoaded as e:
        pytest.fail(f"the model {e} was loaded before the command line was refused")
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) <= 1, err
    return code, err


def listing(folder):
    return sorted(p.name for p in folder.iterdir())


def edit(facts, out, *more, method="memit", model="smollm2"):
    return ["edit", "--model", str(model), "--facts", str(facts), "--method", method, "--out", str(out), *more]


# ------------------------------------------------------------------------- output name and format
@pytest.mark.parametrize("name, more, match", [
    ("edited.gguf", [], "a .gguf name with --format hf would be an HF folder that load_model reads as a GGUF file"),
    ("edited", ["--format", "gguf"], "a GGUF file name ends in .gguf"),
    ("edited", ["--gguf_dtype", "q8_0"], "--gguf_dtype q8_0 applies to --format gguf only"),
    ("edited.gguf", ["--format", "gguf", "--gguf_dtype", "q4_0"], "--gguf_dtype 'q4_0': one of"),
    ("missing/edited", [], "the folder"),
])
def test_an_output_name_that_disagrees_with_the_format_is_refused_before_the_model_loads(
        tmp_path, capsys, facts, no_model, name, more, match):
    before = listing(tmp_path)
    code, err = run(capsys, *edit(facts, tmp_path / name, *more))
    assert code == 2 and match in err and err.startswith("jaxedit edit: error: --")
    assert listing(tmp_path) == before


def _unwritable_folder(tmp_path, monkeypatch):
    if os.geteuid() != 0:
        folder = tmp_path / "read-only"
        folder.mkdir()
        folder.chmod(0o555)
        return folder
    try:
        os.mkdir("/sys/jaxedit-write-probe")
    except OSError:
        return "/sys"  # root writes everywhere but in sysfs
    os.rmdir("/sys/jaxedit-write-probe")
    # root on a machine whose sysfs is writable: the folder refuses new entries as a read-only one would
    folder = tmp_path / "read-only"
    folder.mkdir()
    real_mkdir = os.mkdir

    def refuse(path, *args, **kwargs):
        if os.path.dirname(os.path.abspath(path)) == str(folder):
            raise PermissionError(13, "Permission denied", str(path))
        return real_mkdir(path, *args, **kwargs)

    monkeypatch.setattr(os, "mkdir", refuse)
    return folder


def test_an_unwritable_output_folder_is_refused_before_the_model_loads(tmp_path, capsys, facts, no_model, monkeypatch):
    folder = _unwritable_folder(tmp_path, monkeypatch)
    code, err = run(capsys, *edit(facts, f"{folder}/edited"))
    assert code == 2 and f"--out {folder}/edited: cannot write in {folder}" in err


# ------------------------------------------------------------------------------------ facts
def test_conflicting_facts_are_refused_before_the_model_loads(tmp_path, capsys, no_model):
    path = tmp_path / "facts.jsonl"
    path.write_text(json.dumps(FACT) + "\n" + json.dumps({**FACT, "target_new": "German"}) + "\n")
    code, err = run(capsys, *edit(path, tmp_path / "edited"))
    assert code == 2 and "line 2: the prompt" in err and "but line 1 asks for 'English'" in err


def test_a_csv_with_a_byte_order_mark_is_read(tmp_path, capsys, monkeypatch):
    path = tmp_path / "facts.csv"
    path.write_bytes(b"\xef\xbb\xbfprompt,subject,target_new\n\"The mother tongue of {} is\",Danielle Darrieux,English\n")
    loaded = []

    def stop(source, *a, **k):
        loaded.append(source)
        raise KeyboardInterrupt  # the facts were read: stop here
    monkeypatch.setattr(checkpoint, "load_model", stop)
    assert cli.main(edit(path, tmp_path / "edited")) == 130 and loaded
    assert listing(tmp_path) == ["facts.csv"]


# ---------------------------------------------------------------------------- flags and files
def _case(tmp_path, facts, case):
    """The command line of one mistyped case."""
    out = tmp_path / "edited"
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    return {
        "batch_size not a number": edit(facts, out, "--batch_size", "x"),
        "batch_size 0": edit(facts, out, "--batch_size", "0"),
        "cov_samples 0": edit(facts, out, "--cov_samples", "0"),
        "max_new_tokens -1": edit(facts, out, "--max_new_tokens", "-1"),
        "layers not numbers": edit(facts, out, "--layers", "a,b"),
        "layers decreasing": edit(facts, out, "--layers", "3,1"),
        "layers negative": edit(facts, out, "--layers", "-1"),
        "rome in batches": edit(facts, out, "--batch_size", "4", method="rome"),
        "rome at two layers": edit(facts, out, "--layers", "2,3", method="rome"),
        "unknown method": edit(facts, out, method="ft"),
        "unknown format": edit(facts, out, "--format", "safetensors"),
        "unknown preset": edit(facts, out, "--hparams", "llama-8b"),
        "missing hparams file": edit(facts, out, "--hparams", str(tmp_path / "memit.yaml")),
        "missing corpus file": edit(facts, out, "--corpus", str(tmp_path / "wiki.txt")),
        "report in a missing folder": edit(facts, out, "--report", str(tmp_path / "no" / "r.json")),
        "report over the facts": edit(facts, out, "--report", str(facts)),
        "report is a folder": edit(facts, out, "--report", str(tmp_path)),
        "facts is a folder": edit(tmp_path, out),
        "facts file empty": edit(empty, out),
        "facts file missing": edit(tmp_path / "fact.jsonl", out),
        "model path missing": edit(facts, out, model=tmp_path / "edited-model"),
        "model folder named .gguf": edit(facts, out, model=tmp_path),
        "missing required flag": ["edit", "--facts", str(facts), "--out", str(out)],
    }[case]


CASES = {
    "batch_size not a number": "argument --batch_size: invalid int value: 'x'",
    "batch_size 0": "--batch_size must be >= 1, got 0",
    "cov_samples 0": "--cov_samples must be >= 1, got 0",
    "max_new_tokens -1": "--max_new_tokens must be >= 0, got -1",
    "layers not numbers": "--layers must be comma-separated integers",
    "layers decreasing": "--layers must be increasing and distinct, got '3,1' (e.g. 1,3)",
    "layers negative": "--layers must be layer indices >= 0",
    "rome in batches": "--batch_size 4: ROME edits 1 fact at a time",
    "rome at two layers": "--layers 2,3:",
    "unknown method": "--method: unknown editing method 'ft'",
    "unknown format": "argument --format: invalid choice: 'safetensors'",
    "unknown preset": "--hparams 'llama-8b' is neither a preset",
    "missing hparams file": "memit.yaml: no such file",
    "missing corpus file": "wiki.txt: no corpus file at",
    "report in a missing folder": "--report", "report over the facts": "would overwrite --facts",
    "report is a folder": "is a folder; give a file name",
    "facts is a folder": "is a folder; a facts file is one .jsonl, .json or .csv file",
    "facts file empty": "the file is empty",
    "facts file missing": "no facts file at",
    "model path missing": "no such file or folder (and not 'smollm2' or a hub id owner/name)",
    "model folder named .gguf": "is a folder with a .gguf name",
    "missing required flag": "the following arguments are required: --method",
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_each_mistyped_command_line_is_one_line_before_the_model_loads(tmp_path, capsys, facts, no_model, case):
    if case == "model folder named .gguf":
        tmp_path = tmp_path / "x.gguf"
        tmp_path.mkdir()
        facts = tmp_path / "facts.jsonl"
        facts.write_text(json.dumps(FACT) + "\n")
    argv = _case(tmp_path, facts, case)
    before = listing(tmp_path)
    code, err = run(capsys, *argv)
    assert code == 2 and CASES[case] in err and "Traceback" not in err, err
    assert listing(tmp_path) == before


def test_a_hub_id_missing_from_the_cache_is_one_line(tmp_path, capsys, facts, no_model, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, err = run(capsys, *edit(facts, tmp_path / "edited", model="someone/SomeModel-1B"))
    assert code == 2 and "someone/SomeModel-1B is not in the Hugging Face cache" in err


def test_layers_past_the_model_are_refused_before_c0(tmp_path, capsys, facts, tiny_model_no_c0):
    code, err = run(capsys, *edit(facts, tmp_path / "edited", "--layers", "7"))
    assert code == 2 and "--layers: unknown layer(s) [7]: the model has layers 0..3" in err
    assert listing(tmp_path) == ["facts.jsonl"]


# ----------------------------------------------------------------------------- evaluate
@pytest.mark.parametrize("more, match", [
    (["--batch_size", "0"], "--batch_size must be >= 1"),
    (["--n", "0"], "--n must be >= 1"),
    (["--seed", "-1"], "--seed must be >= 0"),
    (["--json", "/nonexistent-folder/m.json"], "--json /nonexistent-folder/m.json: the folder"),
    (["--cases", "missing-cases.json"], "--cases missing-cases.json"),
    (["--n", "100000000"], "cannot sample n=100000000 cases"),
])
def test_bad_evaluate_flags_are_one_line_before_the_model_loads(capsys, no_model, more, match):
    code, err = run(capsys, "evaluate", "--model", "smollm2", *more)
    assert code == 2 and match in err


# ------------------------------------------------------------------------- errors and --debug
def test_a_program_error_is_one_line_and_debug_shows_the_traceback(tmp_path, capsys, facts, monkeypatch):
    def broken(source, *a, **k):
        raise RuntimeError("the loader broke")
    monkeypatch.setattr(checkpoint, "load_model", broken)
    code, err = run(capsys, *edit(facts, tmp_path / "edited"))
    assert code == 1 and "error: RuntimeError: the loader broke (a program error; --debug shows the traceback)" in err
    with pytest.raises(RuntimeError, match="the loader broke"):
        cli.main(edit(facts, tmp_path / "edited", "--debug"))
    assert listing(tmp_path) == ["facts.jsonl"]  # the staging folder went with the error


# --------------------------------------------------------------------- a killed run's leftovers
def test_a_killed_runs_temporary_output_is_removed_and_said(tmp_path, capsys, facts, no_model):
    left = tmp_path / ".edited.partial-99999999"
    (left / "model").mkdir(parents=True)
    (left / "model" / "model.safetensors").write_bytes(b"half a model")
    with pytest.raises(ModelLoaded):
        cli.main(edit(facts, tmp_path / "edited"))
    assert f"note: removed {left}, the unfinished output of an interrupted run" in capsys.readouterr().out
    assert listing(tmp_path) == ["facts.jsonl"]


def test_the_temporary_output_of_a_live_run_is_left_alone(tmp_path, capsys, facts, no_model):
    live = tmp_path / ".edited.partial-1"
    live.mkdir()
    with open(live / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        code, err = run(capsys, *edit(facts, tmp_path / "edited"))
    assert code == 2 and "another jaxedit run is writing it now" in err
    assert live.is_dir()


def test_write_model_moves_the_staged_model_into_place(tmp_path, monkeypatch):
    def fake_save(folder, params, cfg, tokenizer=None):
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"weights")
        return folder
    monkeypatch.setattr(checkpoint, "save_hf_folder", fake_save)
    cli.write_model(tmp_path / "edited", None, None, None, "hf", source=None, gguf_dtype="float32")
    assert listing(tmp_path) == ["edited"] and listing(tmp_path / "edited") == ["model.safetensors"]
