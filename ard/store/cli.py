"""The `ard-store` command: `ard-store verify DIR` checks every shard, `ard-store info DIR` describes the store.

verify exits 0 when every shard matches the manifest (shape, dtype, count, sha256, indices, labels, finite
values), 1 with one line per bad shard otherwise, 2 when DIR is not a readable store.
"""
from __future__ import annotations

import argparse
import sys
import time

from ard.store import format as fmt


def student_steps_served(manifest: dict) -> list[int]:
    """Every S whose boundaries s * K / S are all saved grid indices."""
    k, saved = manifest["solver"]["num_steps"], set(manifest["grid"]["indices"])
    return [s for s in range(1, k + 1) if k % s == 0 and all(i * k // s in saved for i in range(s + 1))]


def describe(root: str, manifest: dict) -> list[str]:
    """The manifest in words, one line per topic."""
    m, solver, state = manifest, manifest["solver"], manifest["state"]
    on_disk = fmt.completed_shards(root, m)
    listed = len(m["shards"])
    status = "complete" if m["complete"] else "incomplete"
    lines = [
        f"{root}: {m['format']} v{m['version']}, {status}: {sum(s['count'] for s in on_disk.values())} of "
        f"{m['num_trajectories']} trajectories in {len(on_disk)} of {m['num_shards']} shards on disk, "
        f"{fmt.human_bytes(fmt.stored_bytes(on_disk))}",
    ]
    if listed != len(on_disk):
        lines.append(f"manifest:  lists {listed} complete shards, {len(on_disk)} are on disk (re-run the "
                     "precompute command to finish and consolidate)")
    teacher = m["teacher"]
    lines += [
        f"teacher:   {teacher.get('path')} (weights sha256 {teacher.get('weights_sha256', '?')[:16]}..., config "
        f"sha256 {teacher.get('config_sha256', '?')[:16]}..., {teacher.get('numerics', 'diffusers')} numerics)",
        f"solver:    {solver.get('name', '?').upper()} eta {solver.get('eta')}, K = {solver.get('num_steps')} steps, "
        f"{solver.get('timestep_spacing')} spacing, guidance scale {solver.get('guidance_scale')}, clip_sample "
        f"{'on' if solver.get('clip_sample') else 'off'}, {solver.get('prediction_type')} prediction, "
        f"{solver.get('beta_schedule')} betas {solver.get('beta_start')}..{solver.get('beta_end')} over "
        f"{solver.get('num_train_timesteps')}, precision {solver.get('precision')}, CFG on "
        f"{solver.get('cfg_channels', 'all')} channels",
        f"saved:     {len(m['grid']['indices'])} grid states, indices {m['grid']['indices']}, timesteps "
        f"{[t if t >= 0 else 'clean' for t in m['grid']['timesteps']]}",
        f"serves:    students with S = {', '.join(map(str, student_steps_served(m))) or 'none'} steps",
        f"states:    {state['dtype']} {tuple(state['shape'])} each, x0-predictions "
        f"{'saved' if state['x0'] else 'not saved'}; {m['num_classes']} classes; seed {m['seed']}",
        f"layout:    shards of {m['shard_size']} trajectories, computed in micro-batches of {m['micro_batch_size']}",
        f"created:   {', '.join(f'{k} {v}' for k, v in m.get('created', {}).items())}",
        f"store_id:  {m['store_id']}",
    ]
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="ard-store", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("verify", help="check every shard against the manifest").add_argument("dir")
    sub.add_parser("info", help="print the manifest in words").add_argument("dir")
    args = parser.parse_args(argv)
    try:
        if args.command == "info":
            print("\n".join(describe(args.dir, fmt.read_manifest(args.dir))))
            return
        start = time.perf_counter()
        manifest, problems = fmt.verify(args.dir, progress=sys.stderr.isatty())
    except fmt.StoreError as e:
        print(f"ard-store: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    for line in problems:
        print(f"ard-store: bad: {line}", file=sys.stderr)
    if problems:
        print(f"ard-store: {args.dir}: {len(problems)} problem(s) found", file=sys.stderr)
        raise SystemExit(1)
    print(f"ard-store: {args.dir}: ok, {manifest['num_trajectories']} trajectories in {manifest['num_shards']} "
          f"shards, {fmt.human_bytes(fmt.stored_bytes(manifest['shards']))} verified in "
          f"{time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
