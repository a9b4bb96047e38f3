"""The recipe cost benchmark (scripts/bench_recipes.py) times every iteration of a real `ard fit`."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import bench_recipes  # noqa: E402
from test_distill import VAL, store, teacher_dir  # noqa: E402,F401 (fixtures)


def test_every_iteration_is_timed(store, teacher_dir):
    t = bench_recipes.time_recipe(str(store), 4, "ard-N2", "rollout", warmup=1, iterations=3,
                                  extra=(f"--model.init_args.teacher={teacher_dir}", f"--data.init_args.val_count={VAL}",
                                         "--data.init_args.batch_size=8"))
    assert t["iterations"] == 3 and t["batch_size"] == 8
    assert 0 < t["cpu_s"] and 0 < t["wall_s"]
