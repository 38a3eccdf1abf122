"""benchmarks/fidelity.py's goal arithmetic and table on a hand-made result."""
import importlib.util
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "fidelity.py"


def _fidelity():
    spec = importlib.util.spec_from_file_location("fidelity_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _stage(val, site=None):
    row = {"val_loss": val, "sample_rmse": 0.1, "sample_rmse_per_frame": [0.1] * 8}
    return row if site is None else {**row, "site_error_mean": site}


def test_goals_measure_error_ratio_gap_closed_and_distance_to_teacher():
    fidelity = _fidelity()
    result = {"teacher_val_loss": 0.1, "untrained_val_loss": 2.0, "sweep": [], "configs": [
        {"chunk_frames": 2, "overlap_frames": 1, "skipped": "time budget"},
        {"chunk_frames": 1, "overlap_frames": 0, "undistilled": _stage(1.1, 0.6), "stage1": _stage(0.6, 0.15),
         "stage1+2": _stage(0.104)}]}
    goals = fidelity.goals(result)
    assert abs(goals["site_error_reduction"] - 4.0) < 1e-9 and goals["site_error_goal_met"]
    assert abs(goals["val_gap_closed_by_stage1"] - 0.5) < 1e-9 and goals["val_gap_goal_met"]
    assert abs(goals["stage12_over_teacher"] - 0.04) < 1e-9 and goals["stage12_goal_met"]
    result["goals"] = goals
    text = fidelity.table(result)
    assert "| 1 | 0 | stage1+2 | 0.1040 | 1.04x |" in text and "Not run (time budget): Tc=2,To=1" in text


def test_goals_are_missing_until_stage_2_at_tc1_to0_ran():
    fidelity = _fidelity()
    result = {"teacher_val_loss": 0.1, "configs": [
        {"chunk_frames": 1, "overlap_frames": 0, "undistilled": _stage(1.1, 0.6), "stage1": _stage(0.6, 0.15)}]}
    assert fidelity.goals(result) == {}
