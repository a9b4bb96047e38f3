"""A tiny flow-matching teacher end to end: precompute (Euler + CFG on the explicit sigma grid, recorded in a
version-2 manifest that `ard-store verify` accepts) -> distillation with velocity outputs on rollouts -> the exported
student sampled and evaluated against the teacher; SRL and epsilon outputs are refused on a flow store in one line;
a teacher trains with the rectified-flow loss."""
import json

import pytest
import torch

from ard.cli import main as ard_main
from ard.diffusion import flow_sample, trajectory_inputs
from ard.evaluate import evaluate
from ard.modules.teacher_training import TeacherTraining, diffusion_loss, draw_times
from ard.schedules import FlowSchedule
from ard.store import format as fmt
from ard.store.cli import main as store_main
from ard.student import ARDStudent
from ard.student.export import load_exported
from test_bad_inputs import expect_one_line, fit_args, predict_args, teacher  # noqa: F401

FLOW = ["--model.init_args.schedule=flow", "--model.init_args.shift=3.0"]


@pytest.fixture(scope="module")
def flow_store(tmp_path_factory, teacher):
    store = tmp_path_factory.mktemp("flow") / "store"
    ard_main(predict_args(teacher, store, *FLOW, n=24))
    return store


def test_a_flow_store_records_its_grid_and_reproduces(flow_store, teacher):
    manifest = fmt.read_manifest(flow_store)
    sigmas = FlowSchedule(3.0).grid_sigmas(24)
    assert manifest["version"] == 2 and manifest["solver"]["name"] == "flow_euler"
    assert manifest["solver"]["shift"] == 3.0 and manifest["solver"]["prediction_type"] == "flow"
    assert manifest["grid"]["sigmas"] == pytest.approx([sigmas[i] for i in (0, 6, 12, 18, 24)])
    assert manifest["grid"]["timesteps"] == [1000, 900, 750, 500, -1]
    store_main(["verify", str(flow_store)])  # (a damaged store exits non-zero)
    store = fmt.TrajectoryStore(flow_store)
    from ard.teacher import load_teacher

    noise, labels = trajectory_inputs(0, range(3), (1, 8, 8), 10)
    traj = flow_sample(load_teacher(str(teacher)), noise, labels, 24, 2.0, 3.0, [0, 6, 12, 18, 24],
                       clip_sample=True)
    stored = torch.from_numpy(store.read(range(3), list(range(5)), "states").copy())
    torch.testing.assert_close(stored, traj.states, atol=1e-5, rtol=1e-5)


def test_a_student_distils_from_a_flow_store_and_is_evaluated(tmp_path, flow_store, teacher):
    run = tmp_path / "run"
    ard_main(fit_args(run, teacher, flow_store, "--model.init_args.output=velocity",
                      '--model.init_args.recipe={"inputs": "rollout"}'))
    student, timesteps = load_exported(run / "student_ema")
    assert student.schedule.settings() == {"kind": "flow", "shift": 3.0} and student.output == "velocity"
    assert timesteps == pytest.approx([1000.0, 1000 * FlowSchedule(3.0).grid_sigmas(4)[1], 750.0,
                                       1000 * FlowSchedule(3.0).grid_sigmas(4)[3], -1])
    assert isinstance(ARDStudent.from_pretrained(run / "student_ema").schedule, FlowSchedule)
    rows = evaluate(students={"ard": str(run / "student_ema")}, teacher=str(teacher), store=str(flow_store),
                    undistilled_steps=[4], num_samples=8, batch_size=8, bootstrap=2, out=str(tmp_path / "eval"),
                    cache_dir=str(tmp_path / "cache"), grid_samples=2, wandb=False)
    assert [(r["model"], r["steps"]) for r in rows] == [("teacher (Euler, w=2)", 24), ("teacher (Euler, w=2)", 4),
                                                         ("ard", 4)]
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert report["settings"]["solver"]["name"] == "flow_euler"


@pytest.mark.parametrize("extra, needle", [
    (["--model.init_args.output=eps"], "cannot give x0 at sigma = 1"),
    (['--model.init_args.recipe={"targets": "shifted_reconstruction"}'], "SRL"),
])
def test_what_a_flow_store_cannot_train_is_refused_in_one_line(tmp_path, capsys, flow_store, teacher, extra, needle):
    expect_one_line(capsys, lambda: ard_main(fit_args(tmp_path / "run", teacher, flow_store, *extra)), needle)


def test_the_rectified_flow_loss_is_zero_for_the_exact_velocity(monkeypatch):
    from ard.backbones import backbone_of

    module = TeacherTraining(size="digits", schedule="flow")
    x0, noise = torch.randn(4, 1, 8, 8), torch.randn(4, 1, 8, 8)
    t = draw_times(module.schedule, 4, "cpu", torch.Generator().manual_seed(0))
    assert bool(((t > 0) & (t <= 1000)).all()) and t.dtype == torch.float64
    labels = torch.zeros(4, dtype=torch.long)
    assert float(diffusion_loss(module.model, module.schedule, x0, labels, t, noise).min()) > 0
    monkeypatch.setattr(type(backbone_of(module.model)), "predict", lambda self, model, x, tt, y: noise - x0)
    assert float(diffusion_loss(module.model, module.schedule, x0, labels, t, noise).max()) == 0.0


@pytest.mark.slow  # (about a minute: every preset of the flow digits, end to end)
def test_the_flow_digits_presets_run_teacher_trajectories_and_students(tmp_path, monkeypatch):
    """configs/digits_flow/ over the digits presets: two steps of the rectified-flow teacher; its trajectories on the
    explicit sigma grid; two steps of the ARD student (velocity head) and of the baseline; their evaluation."""
    import wandb

    from ard.evaluate import main as eval_main
    from test_bad_inputs import ROOT

    monkeypatch.setenv("WANDB_SILENT", "true")
    over = lambda name: ["-c", str(ROOT / f"configs/digits/{name}.yaml"), "-c",  # noqa: E731
                         str(ROOT / f"configs/digits_flow/{name}.yaml")]
    ard_main(["fit", *over("teacher"), f"--trainer.default_root_dir={tmp_path}", "--trainer.limit_val_batches=0",
              "--trainer.max_steps=2", "--trainer.enable_progress_bar=false", "--trainer.logger=false"])
    wandb.finish()
    teacher = tmp_path / "teacher_ema"
    store = tmp_path / "store"
    ard_main(["predict", *over("trajectories"), f"--model.init_args.teacher={teacher}", f"--data.init_args.path={store}",
              "--data.init_args.num_trajectories=32", "--data.init_args.shard_size=32",
              f"--trainer.default_root_dir={tmp_path / 'precompute'}"])
    assert fmt.read_manifest(store)["solver"] == {"name": "flow_euler", "num_steps": 24, "shift": 1.0,
                                                  "guidance_scale": 2.0, "clip_sample": True,
                                                  "prediction_type": "flow", "precision": "fp32"}
    for preset in ([], [*over("baseline")]):
        run = tmp_path / f"run{len(preset)}"
        ard_main(["fit", *over("ard"), *preset, f"--model.init_args.teacher={teacher}", f"--data.init_args.path={store}",
                  "--data.init_args.val_count=16", "--data.init_args.batch_size=16", f"--trainer.default_root_dir={run}", "--trainer.max_steps=2",
                  "--trainer.limit_val_batches=0", "--trainer.logger=false", "--trainer.enable_progress_bar=false"])
        assert ARDStudent.from_pretrained(run / "student_ema").history_blocks == (0 if preset else 1)
    students = {"baseline": str(tmp_path / "run4" / "student_ema"), "ard": str(tmp_path / "run0" / "student_ema")}
    eval_main(["--config", str(ROOT / "configs/digits_flow/eval.yaml"), f"--students={json.dumps(students)}",
               f"--teacher={teacher}", f"--store={store}", "--num_samples=20", "--batch_size=20", "--bootstrap=2",
               f"--out={tmp_path / 'eval'}", f"--cache_dir={tmp_path / 'cache'}", "--grid_samples=2", "--wandb=false"])
    rows = json.loads((tmp_path / "eval" / "report.json").read_text())["rows"]
    assert [r["model"] for r in rows] == ["teacher (Euler, w=2)"] * 2 + ["baseline", "ard"]


def test_the_shipped_flow_teacher_draws_the_digit_it_is_asked_for():
    """ard/assets/digits_flow_teacher (configs/digits_flow/teacher.yaml; docs/results/teacher_flow_agreement.json):
    the digits DiT's architecture trained with rectified flow, whose 24-step Euler samples at the flow presets'
    guidance the digit classifier assigns to the asked class."""
    import yaml

    from ard.data.digits import to_uint8
    from ard.metrics.classifier import load_digit_classifier
    from ard.teacher import load_teacher
    from ard.bench import ROOT

    asset = ROOT / "ard/assets/digits_flow_teacher"
    trained = yaml.safe_load((asset / "training_config.yaml").read_text())["model"]["init_args"]
    assert trained["schedule"] == "flow" and trained["size"] == "digits"
    guidance = yaml.safe_load((ROOT / "configs/digits_flow/trajectories.yaml").read_text())["model"]["init_args"]
    teacher = load_teacher(str(asset))
    noise, labels = trajectory_inputs(7, range(40), (1, 8, 8), 10)
    with torch.no_grad():
        images = flow_sample(teacher, noise, labels, 24, guidance["guidance_scale"], 1.0, [24],
                             clip_sample=True).states[:, -1]
        predicted = load_digit_classifier()[0](to_uint8(images)).argmax(dim=1)
    assert (predicted == labels).float().mean() >= 0.9
