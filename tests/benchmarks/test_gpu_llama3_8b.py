"""The GPU benchmark's CPU smoke run on a tiny config."""
from benchmarks import gpu_llama3_8b


def test_gpu_benchmark_tiny_smoke(tmp_path):
    out = gpu_llama3_8b.main(["--tiny", "--n", "4", "--methods", "memit", "emmet", "--json_out", str(tmp_path / "r.json")])
    assert out["config"] == "tiny" and out["n"] == 4
    assert out["cov_tokens"] >= 4096 and out["value_tflop"] > 0 and out["peak_memory_gib"] > 0
    for k in ("templates", "C0_all_layers", "values", "keys[memit]", "solve[emmet]"):
        assert out["seconds"][k] >= 0
    assert (tmp_path / "r.json").exists()
