"""The recipe cost benchmark (ard.bench.recipe_cost, scripts/bench_recipes.py) times every iteration of a real
`ard fit`."""
from ard.bench.recipe_cost import time_recipe
from test_distill import VAL, store, teacher_dir  # noqa: F401 (fixtures)


def test_every_iteration_is_timed(store, teacher_dir):
    t = time_recipe(str(store), 4, "ard-N2", "rollout", warmup=1, iterations=3,
                    extra=(f"--model.init_args.teacher={teacher_dir}", f"--data.init_args.val_count={VAL}",
                           "--data.init_args.batch_size=8"))
    assert t["iterations"] == 3 and t["batch_size"] == 8
    assert 0 < t["cpu_s"] and 0 < t["wall_s"]
