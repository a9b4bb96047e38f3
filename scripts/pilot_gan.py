"""A short ARD + GAN pilot on digits (one S, one seed): which re-noising and which fake to make the defaults, and
whether the discriminator memorises the 1438 training digits. Not the benchmark (scripts/bench_digits.py
--gan-variants runs that: S = 2 and 4, 3 seeds).

    python scripts/pilot_gan.py [--steps 2] [--reg-steps 300] [--gan-steps 250] [--warmup 50] [--workers 2]

1. the training store and the regression ARD student (scripts/bench_digits.py's `fit`, resumable);
2. from that student: the same student trained --gan-steps more iterations without the GAN (same batch and lr:
   the comparison), and one GAN stage per knob setting in KNOBS;
3. one evaluation of all of them (ard.evaluate, the shared held-out noises), the discriminator's health over
   the last --health-window iterations (CSV logs: D loss, mean logits on real, fake and held-out real digits,
   the adaptive weight) and the training times; written to <results>/gan_pilot.{json,md}, the README's section
   between `<!-- gan-pilot:start -->` and `<!-- gan-pilot:end -->`, and printed.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_digits import ROOT, fit, health, run, train_seconds, update_readme  # noqa: E402

from ard.atomic import write_text_atomic  # noqa: E402

# knob setting -> overrides of configs/digits/ard_gan.yaml
KNOBS: dict[str, list[str]] = {
    "renoise-none": ["--model.init_args.gan_renoise=none"],
    "renoise-independent-uniform": ["--model.init_args.gan_renoise=independent",
                                    "--model.init_args.gan_noise_levels=uniform"],
    "renoise-same-uniform": ["--model.init_args.gan_renoise=same", "--model.init_args.gan_noise_levels=uniform"],
    "renoise-independent-high": ["--model.init_args.gan_renoise=independent",
                                 "--model.init_args.gan_noise_levels=high"],
    "rollout-independent-uniform": ["--model.init_args.gan_fake=rollout", "--model.init_args.gan_renoise=independent",
                                    "--model.init_args.gan_noise_levels=uniform"],
    "weight1-independent-uniform": ["--model.init_args.gan_weight=1", "--model.init_args.gan_renoise=independent",
                                    "--model.init_args.gan_noise_levels=uniform"],
    "augment-independent-uniform": ["--model.init_args.gan_augment=translation_cutout",
                                    "--model.init_args.gan_renoise=independent",
                                    "--model.init_args.gan_noise_levels=uniform"],
}
def markdown(result: dict) -> str:
    st = result["settings"]
    lines = [f"S = {st['steps']}, seed {st['seed']}, {st['num_trajectories']} trajectories: the regression ARD student "
             f"after {st['reg_steps']} iterations (batch 64), then {st['gan_steps']} more iterations (batch 48, lr 1e-4) "
             f"without the GAN (`ard-continued`) or with it (warm-up {st['warmup']}), one per knob setting; "
             f"{st['num_samples']} samples each, ± the bootstrap sd. Every student is its run's EMA (decay 0.999, as "
             "the preset): in runs this short it stays close to where the run started (0.999^120 = 0.89), so the "
             "differences are damped. Health: means over the last "
             f"{st['health_window']} iterations (logits on real training digits, on fakes, on the 359 held-out digits). "
             "Time: seconds per iteration over the regression stage's, wall time on a machine shared with other jobs.",
             "", "| model | FID vs real | FID vs teacher | same-noise MSE | precision | recall | time / iteration "
             "| D loss | logit real | logit fake | logit held-out | lambda |", "|---" * 12 + "|"]
    for r in result["rows"]:
        h = r.get("health", {})
        cell = [f"{h[k]:.2f}" if h.get(k) is not None else "-" for k in
                ("d_loss", "logits_real", "logits_fake", "logits_holdout", "weight")]
        ratio = r.get("seconds_per_iteration_vs_regression")
        lines.append(f"| {r['model']} | {r['fid']:.2f} ± {r['fid_sd']:.2f} | {r['fid_vs_teacher']:.2f} ± "
                     f"{r['fid_vs_teacher_sd']:.2f} | {r['mse_vs_teacher']:.4f} | {r['precision']:.3f} | "
                     f"{r['recall']:.3f} | {'-' if ratio is None else f'{ratio:.2f}x'} | " + " | ".join(cell) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default="runs/gan_pilot")
    parser.add_argument("--steps", type=int, default=2, help="student steps S")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-trajectories", type=int, default=4096)
    parser.add_argument("--reg-steps", type=int, default=300, help="iterations of the regression student")
    parser.add_argument("--gan-steps", type=int, default=250, help="iterations of each second stage")
    parser.add_argument("--warmup", type=int, default=50, help="GAN warm-up iterations")
    parser.add_argument("--knobs", nargs="+", default=list(KNOBS), choices=list(KNOBS))
    parser.add_argument("--num-samples", type=int, default=1000)
    parser.add_argument("--health-window", type=int, default=50)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--results", default="docs/results")
    args = parser.parse_args()

    work = (ROOT / args.work).resolve()
    store, s, seed = work / "store", args.steps, args.seed
    start = time.time()
    run([sys.executable, "scripts/precompute_trajectories.py", "-c", "configs/digits/trajectories.yaml",
         "--out", str(store), "--num-trajectories", str(args.num_trajectories)], work / "precompute.log", 2)
    regression = fit(work, store, "ard", s, seed, args.reg_steps, 1)
    jobs = [("ard-continued", work, [])] + [("ard-gan", work / k, [f"--model.init_args.gan_warmup={args.warmup}",
                                                                   *KNOBS[k]]) for k in args.knobs]
    with ThreadPoolExecutor(args.workers) as pool:
        students = list(pool.map(lambda j: fit(j[1], store, j[0], s, seed, args.gan_steps, 1, regression, tuple(j[2])),
                                 jobs))
    names = ["ard", "ard-continued"] + args.knobs
    named = dict(zip(names, map(str, [regression] + students)))

    from ard.evaluate import evaluate

    rows = evaluate(students=named, undistilled_steps=[], num_samples=args.num_samples, out=str(work / "eval"),
                    cache_dir=str(work / "cache"), wandb=False)
    reg_seconds = train_seconds(regression)
    keep = ("fid", "fid_sd", "fid_vs_teacher", "fid_vs_teacher_sd", "mse_vs_teacher", "precision", "recall")
    out_rows = []
    for r in rows:
        row = {"model": r["model"], "steps": r["steps"], **{k: r[k] for k in keep}}
        if r["model"] in named:
            seconds = train_seconds(Path(named[r["model"]]))
            iterations = args.reg_steps if r["model"] == "ard" else args.gan_steps
            row |= {"train_seconds": seconds, "iterations": iterations,
                    "seconds_per_iteration_vs_regression": seconds / iterations / (reg_seconds / args.reg_steps)}
            if r["model"] in args.knobs:
                row["health"] = health(Path(named[r["model"]]).parent, args.health_window)
                row["overrides"] = KNOBS[r["model"]]
        out_rows.append(row)
    settings = {"steps": s, "seed": seed, "num_trajectories": args.num_trajectories, "reg_steps": args.reg_steps,
                "gan_steps": args.gan_steps, "warmup": args.warmup, "num_samples": args.num_samples,
                "health_window": args.health_window, "gan_preset": "configs/digits/ard_gan.yaml", "threads_per_run": 1, "workers": args.workers,
                "load_average_at_end": os.getloadavg(), "invocation_seconds": time.time() - start}
    result = {"settings": settings, "rows": out_rows}
    write_text_atomic(ROOT / args.results / "gan_pilot.json", json.dumps(result, indent=1) + "\n")
    table = markdown(result)
    write_text_atomic(ROOT / args.results / "gan_pilot.md", table)
    update_readme(table, "gan-pilot")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
