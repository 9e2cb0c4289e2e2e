"""The real-shapes benchmark's plumbing on tiny configs (--dry): plans from the memory plan's
programs, a peak measured around the run, composite plans."""
import pytest

from benchmarks import memory_plan, real_shapes


@pytest.fixture
def dry(monkeypatch):
    monkeypatch.setenv(real_shapes.DRY, "1")


def test_the_memory_plans_float64_programs_compile(dry):
    factor = memory_plan.analyse(memory_plan.factor_program(64).compile())
    solve = memory_plan.analyse(memory_plan.solve_program(64, 16, 8).compile())
    assert factor["out"] >= 8 * 64 * 64 and factor["total"] > factor["args"]  # the float64 factor comes out
    assert solve["args"] >= 8 * 64 * 64 and solve["total"] > 0


def test_a_stage_measures_its_peak_beside_its_plan(dry, tmp_path):
    res = real_shapes.stage_factor("8b-2", tmp_path)
    assert res["factored"] and res["shape"] == "96 x 96"
    assert res["plan"]["total"] > 8 * 96 * 96 and res["peak"] >= res["rss_before"] > 0 and res["seconds"] > 0
    res = real_shapes.stage_solve("8b-2", tmp_path, 8)
    assert res["finite"] and res["peak"] >= res["rss_before"]


def test_a_composite_plan_is_what_is_held_plus_the_largest_program_beyond_it():
    a = {"total": 10, "compile_s": 1.0}
    b = {"total": 7, "compile_s": 2.0}
    plan = real_shapes.composite_plan(held=5, programs={"a": (a, 5), "b": (b, 0)})
    assert plan["total"] == 5 + 7 and plan["largest"] == "b" and plan["compile_s"] == 3.0


def test_a_program_past_max_gb_is_not_run(monkeypatch):
    monkeypatch.setenv(real_shapes.MAX_GB, "1")
    with pytest.raises(real_shapes.TooLarge, match="plan 2.0 GB > --max_gb 1.0"):
        real_shapes.check_fits({"total": 2e9})
