"""The evaluate command on a tiny run writes a report with every key, consistent with its own inputs."""
import json
import math

import torch

from ard.evaluate import REPORT_KEYS, evaluate
from ard.student import ARDStudent
from ard.teacher import build_dit


def test_evaluate_tiny_run_writes_full_report(tmp_path):
    torch.manual_seed(0)
    teacher = build_dit("digits", num_layers=2).eval()
    teacher.save_pretrained(tmp_path / "teacher")
    student_dir = tmp_path / "student"
    ARDStudent(teacher, num_steps=2, history_blocks=1).save_pretrained(student_dir)
    (student_dir / "ard_sampling.json").write_text(json.dumps({"timesteps": [943, 451, -1]}))

    rows = evaluate(students={"ard": str(student_dir)}, teacher=str(tmp_path / "teacher"), teacher_steps=4,
                    undistilled_steps=[2], num_samples=40, bootstrap=3, batch_size=20, out=str(tmp_path / "out"),
                    cache_dir=str(tmp_path / "cache"), grid_samples=4, wandb=False)

    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert [r["model"] for r in report["rows"]] == ["teacher (DDIM, w=2)"] * 2 + ["ard"]
    for row in report["rows"]:
        assert set(REPORT_KEYS) <= set(row)
        assert row["num_samples"] == 40
    teacher_row, two_step, student = rows
    assert teacher_row["mse_vs_teacher"] == 0 and abs(teacher_row["fid_vs_teacher"]) < 1e-3
    assert two_step["mse_vs_teacher"] > 0 and two_step["nfe"] == 4 and teacher_row["nfe"] == 8
    assert student["steps"] == 2 and student["nfe"] == 2
    assert math.isfinite(student["mse_vs_teacher"]) and student["mse_vs_teacher"] > 0
    assert 0 < student["gflops_per_image"] < two_step["gflops_per_image"]  # 2 passes against 2 x 2 (CFG)
    table = (tmp_path / "out" / "report.md").read_text()
    assert table.count("\n| ") == 3 and (tmp_path / "out" / "samples.png").exists()
    assert list((tmp_path / "cache").glob("eval_set-*.npz"))  # the teacher's samples are cached
