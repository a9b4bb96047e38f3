"""The digits benchmark tool behind scripts/bench_digits.py, scripts/bench_controls.py, scripts/pilot_gan.py and
scripts/bench_recipes.py.

    registry     the experiments: students, training recipes, GAN stages, the GAN pilot's knobs
    runs         one precompute or `ard fit` in a subprocess (resumable) and its training time
    benchmark    a benchmark invocation: train, evaluate, probe, report; refreshing a report's teacher rows
    pilot        the GAN pilot: its runs and its report
    probes       post-hoc measurements of trained students: exposure bias, history gate, discriminator health
    aggregate    mean and sd over seeds, and the verdicts against the baseline and the continued student
    reports      the report files <results>/<stem>.{json,md,png}: writing them, merging committed rows
    render       a report file's Markdown: a benchmark report, the GAN pilot
    plots        a benchmark report's figures
    overview     Markdown over several committed reports: the recipe grid, the docs' results summary
    controls     a control report over several teachers' reports: ARD's seed-paired ratio to the baseline per teacher
    docs         refreshing the docs' sections from the committed reports (the only writer of docs)
    recipe_cost  the cost of one training iteration of each recipe

A run writes only <results>/<stem>.* and its work directory (runs/); `docs.refresh` copies the reports into the
docs, on request.
"""
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # the repository: the tool runs its configs and scripts from here
