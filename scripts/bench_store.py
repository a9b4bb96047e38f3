"""Benchmarks of the trajectory store, printed as JSON (the figures of docs/store.md's "Measured" section).

    python scripts/bench_store.py [--sections read,writer,kill,ddp,text] [--work DIR] > bench_store.json

read:   random-batch read throughput (batches of 256, indices sorted within a batch, warm page cache) of a
        digits store (the preset's geometry: 16384 x 25 states of 1x8x8 fp32 in 8 shards, a 4-step student's 5
        states read) and of ImageNet-shaped stores (16384 x 5 states of 4x32x32 fp16; shards of 4096, and shards
        of 64 so that a batch touches about as many shards as in the full 2.5M store) against a raw numpy
        memmap of the same bytes (one .npy: the store's own gather, one np.take, and plain fancy indexing) and
        the public ARD code's layout (one .npz per sample per timestep). Methods are timed in turns, by wall and
        by CPU time; the DataModule's float32 batches are timed on their own (see bench_read_one).
writer: share of precompute wall time spent outside the teacher's forward passes (digits-size DiT, random
        weights; the time inside the forward calls is measured with forward hooks).
kill:   SIGKILLs at random moments during a digits precompute (scripts/precompute_trajectories.py; uniform
        in the first seconds after its progress bar appears), each followed by the same command (which is
        killed in turn), then one run to the end: lost / duplicated trajectories and whether the
        store equals an uninterrupted run's.
ddp:    1 process against 2 (DDP on CPU, gloo): identical shards?
text:   bytes per trajectory and per prompt of text stores: the digits-T2I preset (its 40 captions encoded into a
        store by the hash encoder; states from the preset's geometry) and the PixArt-alpha-512 preset (states from
        its geometry; prompts of 20 / 40 / 80 valid T5-XXL tokens of width 4096 in fp16, and the 120-token padded
        embedding a store of the full encoder output would keep).
Run with OMP_NUM_THREADS=1 on a shared CPU; each section takes about a minute.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from ard.diffusion import solver_identity
from ard.store import format as fmt

ROOT = Path(__file__).resolve().parents[1]
BATCH = 256


# ------------------------------------------------------------------------------------------------ read
def synthetic_store(root: Path, n: int, saved: int, shape: tuple, dtype: str, shard_size: int) -> np.ndarray:
    """A store of random states written through the store's own writer; returns all states (n, saved, *shape)."""
    m = fmt.new_manifest(teacher={"weights_sha256": "0" * 64, "config_sha256": "0" * 64},  # no teacher: made up
                         solver=solver_identity(saved - 1, "leading", 1.0, False, "all", "fp32"),
                         grid_indices=list(range(saved)),
                         grid_timesteps=[999 - i for i in range(saved - 1)] + [-1], state_shape=shape, dtype=dtype,
                         with_x0=False, num_classes=10, num_trajectories=n, shard_size=shard_size, seed=0,
                         micro_batch_size=shard_size)
    fmt.create_store(root, m)
    states = np.random.default_rng(0).standard_normal((n, saved, *shape)).astype(fmt.NUMPY_DTYPE[dtype])
    for k in range(m["num_shards"]):
        a, count = fmt.shard_span(m, k)
        fmt.write_shard(root, m, k, {"states": states[a:a + count], "labels": np.arange(a, a + count) % 10,
                                     "index": np.arange(a, a + count)})
    fmt.consolidate(root)
    return states


def compare(methods: dict, batches: list[np.ndarray], rounds: int) -> dict:
    """Batches per second of each method. The methods take turns batch by batch (so the load of a shared machine
    hits all alike), each at its own offset in the batch list, so that no method reads the batch the previous one
    just pulled into the CPU caches; a round is one pass over the batches; median and best round of `rounds` after
    a warm-up, by wall time and by this thread's CPU time (which waiting for a busy core does not inflate)."""
    wall = {name: np.zeros(rounds + 1) for name in methods}
    cpu = {name: np.zeros(rounds + 1) for name in methods}
    offset = max(1, len(batches) // len(methods))
    for r in range(rounds + 1):
        for i in range(len(batches)):
            for m, (name, fn) in enumerate(methods.items()):
                b = batches[(i + m * offset) % len(batches)]
                start, start_cpu = time.perf_counter(), time.thread_time()
                fn(b)
                cpu[name][r] += time.thread_time() - start_cpu
                wall[name][r] += time.perf_counter() - start
    return {name: {"batches_per_s_median": round(len(batches) / float(np.median(wall[name][1:])), 1),
                   "batches_per_s_best": round(len(batches) / float(wall[name][1:].min()), 1),
                   "batches_per_cpu_s_median": round(len(batches) / float(np.median(cpu[name][1:])), 1)}
            for name in methods}


def bench_read_one(work: Path, name: str, n: int, saved: int, read: list[int], shape: tuple, dtype: str,
                   shard_size: int, npz_samples: int, rounds: int) -> dict:
    from ard.data.trajectories import StudentBatches

    root = work / name
    states = synthetic_store(root / "store", n, saved, shape, dtype, shard_size)
    raw_path = root / "raw.npy"
    np.save(raw_path, states)
    del states
    store = fmt.TrajectoryStore(root / "store")
    raw = np.load(raw_path, mmap_mode="r")
    raw_flat = np.asarray(raw).reshape(n * saved, -1)  # (n * saved, C*H*W) plain view of the memmap
    pos = np.asarray(read)
    rng = np.random.default_rng(1)
    batches = [np.sort(rng.choice(n, BATCH, replace=False)) for _ in range(32)]

    def read_raw(b):  # the store's gather, from one file: one take
        out = np.empty((len(b), len(pos), *shape), dtype=raw.dtype)
        np.take(raw_flat, (b[:, None] * saved + pos[None, :]).ravel(), axis=0, out=out.reshape(len(b) * len(pos), -1),
                mode="clip")
        return out

    assert np.array_equal(read_raw(batches[0]), store.read(batches[0], read))
    dataset = StudentBatches(store, read, with_x0=False, check_finite=True)  # what the DataModule yields
    out = {"trajectories": n, "saved_states": saved, "read_states": len(read), "state_shape": list(shape),
           "dtype": dtype, "shard_size": shard_size, "shards": store.manifest["num_shards"],
           "mean_shards_per_batch": round(float(np.mean([len(np.unique(b // shard_size)) for b in batches])), 1),
           "batch_bytes": BATCH * len(read) * int(np.prod(shape)) * np.dtype(fmt.NUMPY_DTYPE[dtype]).itemsize}
    out.update(compare({"store": lambda b: store.read(b, read), "raw_memmap_take": read_raw,
                        "raw_memmap_fancy_index": lambda b: raw[b[:, None], pos[None, :]]}, batches, rounds))
    # Timed on its own: its float32 copies (twice the bytes) leave the allocator handing the next method fresh,
    # unfaulted pages, which slowed whichever method came next by up to 2.8x
    out.update(compare({"datamodule_batch_float32": lambda b: dataset[b]}, batches, rounds))
    # The public ARD code's layout: one .npz per sample per timestep (only the states a student reads here).
    npz_dir = root / "npz"
    npz_dir.mkdir()
    for i in range(npz_samples):
        for t in read:
            np.savez(npz_dir / f"{i:07d}_{t:02d}.npz", x=raw[i, t])
    npz_batches = [np.sort(rng.choice(npz_samples, BATCH, replace=False)) for _ in range(4)]
    out["npz_files"] = npz_samples * len(read)

    def read_npz(b):
        return np.stack([np.stack([np.load(npz_dir / f"{i:07d}_{t:02d}.npz")["x"] for t in read]) for i in b])

    assert np.array_equal(read_npz(npz_batches[0]), store.read(npz_batches[0], read))
    both = compare({"store": lambda b: store.read(b, read), "npz": read_npz}, npz_batches, 2)
    out["npz_per_sample_per_timestep"] = both["npz"]
    med = "batches_per_s_median"
    out["store_vs_raw_memmap_take"] = round(out["store"][med] / out["raw_memmap_take"][med], 3)
    out["store_vs_raw_memmap_fancy_index"] = round(out["store"][med] / out["raw_memmap_fancy_index"][med], 3)
    cpu = "batches_per_cpu_s_median"
    out["store_vs_raw_memmap_take_cpu"] = round(out["store"][cpu] / out["raw_memmap_take"][cpu], 3)
    out["store_vs_npz"] = round(both["store"][med] / both["npz"][med], 1)
    shutil.rmtree(root)
    return out


def bench_read(work: Path, rounds: int) -> dict:
    four_step = [0, 6, 12, 18, 24]
    return {
        "digits_preset_geometry": bench_read_one(work, "digits", 16384, 25, four_step, (1, 8, 8), "float32", 2048,
                                                 4096, rounds),
        "imagenet_shards_4096": bench_read_one(work, "in4096", 16384, 5, list(range(5)), (4, 32, 32), "float16",
                                               4096, 4096, rounds),
        # a batch of 256 touches ~160 shards here, as in the full 2.5M store (611 shards of 4096: ~210)
        "imagenet_shards_64_fan_out": bench_read_one(work, "in64", 16384, 5, list(range(5)), (4, 32, 32), "float16",
                                                     64, 4096, rounds),
    }


# ------------------------------------------------------------------------------------------------ writer
def tiny_teacher(path: Path, **overrides) -> Path:
    from ard.backbones.dit import build_dit

    torch.manual_seed(0)
    model = build_dit("digits", **overrides)
    for p in model.parameters():  # non-trivial outputs (adaLN-zero starts at epsilon = 0)
        p.data.add_(0.05 * torch.randn_like(p))
    model.save_pretrained(path)
    return path


def bench_writer(work: Path, n: int) -> dict:
    """Digits-size teacher (6 blocks), K = 24, CFG 2, all 25 states saved in fp32, shards of 256."""
    import lightning as L

    from ard.modules.precompute import PrecomputeTrajectories
    from ard.store.jobs import StoreShards
    from ard.store.writer import TrajectoryStoreWriter

    teacher = tiny_teacher(work / "teacher6")
    module = PrecomputeTrajectories(teacher=str(teacher), guidance_scale=2.0, clip_sample=True, micro_batch_size=256)
    inside = {"s": 0.0, "calls": 0}

    def pre(mod, args):
        inside["t"] = time.perf_counter()

    def post(mod, args, out):
        inside["s"] += time.perf_counter() - inside["t"]
        inside["calls"] += 1

    module.teacher.register_forward_pre_hook(pre)
    module.teacher.register_forward_hook(post)

    class LoopClock(L.Callback):  # the predict loop's wall time: first shard to the consolidated manifest
        def on_predict_start(self, trainer, pl_module):
            self.start = time.perf_counter()

        def on_predict_end(self, trainer, pl_module):
            self.seconds = time.perf_counter() - self.start

    clock = LoopClock()
    data = StoreShards(str(work / "writer_store"), num_trajectories=n, shard_size=256)
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[TrajectoryStoreWriter(progress_bar=False), clock])
    start = time.perf_counter()
    trainer.predict(module, datamodule=data)
    total = time.perf_counter() - start
    loop = clock.seconds  # TrajectoryStoreWriter.on_predict_end (consolidation) ran before LoopClock's
    return {"trajectories": n, "teacher_forward_calls": inside["calls"], "forward_s": round(inside["s"], 2),
            "predict_loop_s": round(loop, 2), "trainer_predict_s": round(total, 2),
            "outside_forward_share_of_loop": round(1 - inside["s"] / loop, 4),
            "outside_forward_share_incl_setup": round(1 - inside["s"] / total, 4),
            "trajectories_per_s": round(n / loop, 1)}


# ------------------------------------------------------------------------------------------------ kill, ddp
def script_cmd(out: Path, teacher: Path, n: int, *extra: str) -> list[str]:
    return [sys.executable, str(ROOT / "scripts/precompute_trajectories.py"), "-c", "configs/digits/trajectories.yaml",
            "--out", str(out), "--num-trajectories", str(n), "--batch-size", "16",
            f"--model.init_args.teacher={teacher}", "--data.init_args.shard_size=64",
            f"--trainer.default_root_dir={out.parent / (out.name + '_run')}", *extra]


ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def run(cmd: list[str]) -> float:
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(proc.stderr[-3000:])
    return time.perf_counter() - start


def shard_digests(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): fmt.sha256_file(p) for p in sorted((root / "shards").rglob("*")) if p.is_file()}


def count_check(root: Path, n: int) -> dict:
    """Lost and duplicated trajectory indices over all shard files on disk."""
    index = np.concatenate([np.load(p) for p in sorted((root / "shards").glob("shard-*/index.npy"))])
    counts = np.bincount(index, minlength=n)
    return {"lost": int((counts == 0).sum()), "duplicated": int((counts > 1).sum())}


def bench_kill(work: Path, kills: int, n: int, max_delay: float) -> dict:
    teacher = tiny_teacher(work / "teacher1", num_layers=1)
    ref_s = run(script_cmd(work / "kill_ref", teacher, n))
    rng = random.Random(0)
    out = work / "kill_store"
    events = []
    for i in range(kills):
        log = work / f"kill_{i}.log"
        with open(log, "w") as err:
            proc = subprocess.Popen(script_cmd(out, teacher, n), cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL,
                                    stderr=err)
            while "traj/s" not in log.read_text() and proc.poll() is None:  # the progress bar: precomputing
                time.sleep(0.02)
            before = len(list((out / "shards").glob("shard-*/shard.json")))
            delay = rng.uniform(0, max_delay)
            time.sleep(delay)
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        shards = len(list((out / "shards").glob("shard-*/shard.json")))
        tmp = len(list((out / "shards").glob(".shard-*.tmp")))
        events.append({"after_s": round(delay, 2), "complete_shards_before": before, "complete_shards_after": shards,
                       "half_written_shard_dirs": tmp})
    final_s = run(script_cmd(out, teacher, n))
    _, problems = fmt.verify(out)
    return {"trajectories": n, "shards": -(-n // 64), "kills": events, "uninterrupted_s": round(ref_s, 1),
            "final_run_s": round(final_s, 1), **count_check(out, n), "verify_problems": problems,
            "identical_to_uninterrupted": shard_digests(out) == shard_digests(work / "kill_ref")}


def bench_ddp(work: Path, n: int) -> dict:
    teacher = tiny_teacher(work / "teacher_ddp", num_layers=1)
    one_s = run(script_cmd(work / "ddp1", teacher, n, "--devices", "1"))
    two_s = run(script_cmd(work / "ddp2", teacher, n, "--devices", "2"))
    return {"trajectories": n, "one_process_s": round(one_s, 1), "two_processes_s": round(two_s, 1),
            "identical": shard_digests(work / "ddp1") == shard_digests(work / "ddp2"),
            **{f"two_processes_{k}": v for k, v in count_check(work / "ddp2", n).items()}}


def bench_text(work: Path) -> dict:
    """Bytes per trajectory and per prompt of the text presets' stores (see the module docstring)."""
    import yaml

    from ard.data.captions import digit_captions
    from ard.store.text import encode_prompts
    from ard.text_encoders import HashEncoder

    def preset(*files: str) -> dict:  # the overlays' merged model and data init_args
        merged: dict = {}
        for f in files:
            config = yaml.safe_load((ROOT / f).read_text())
            for group in ("model", "data"):
                merged.setdefault(group, {}).update(config.get(group, {}).get("init_args", {}))
        return merged

    def trajectory_bytes(config: dict, shape: tuple, steps: int) -> int:
        saved = len(config["model"].get("save_indices") or range(steps + 1))
        item = {"float16": 2, "bfloat16": 2, "float32": 4}[config["data"].get("dtype", "float32")]
        return saved * int(np.prod(shape)) * item + 16  # states + the int64 label and index

    digits = preset("configs/digits/trajectories.yaml", "configs/digits_t2i/trajectories.yaml")
    section = encode_prompts(work / "digits_t2i", digit_captions(), HashEncoder(dim=32))
    prompts = section["prompts"]["count"]
    embeddings = sum(shard["bytes"] for shard in section["embeddings"]["shards"])
    per_prompt = (embeddings + section["lengths"]["bytes"] + section["prompts"]["bytes"]) / prompts
    alpha = preset("configs/imagenet256/trajectories.yaml", "configs/pixart/alpha512_trajectories.yaml")
    t5 = lambda tokens: tokens * 4096 * 2 + 8  # noqa: E731  fp16 tokens + the int64 length
    return {"digits_t2i": {"bytes_per_trajectory": trajectory_bytes(digits, (1, 8, 8), 24),
                           "bytes_per_prompt": per_prompt, "prompts": prompts,
                           "embedding_tokens": section["embeddings"]["shape"][0]},
            "pixart_alpha512": {"bytes_per_trajectory": trajectory_bytes(alpha, (4, 64, 64), 24),
                                "bytes_per_prompt_20_40_80_tokens": [t5(n) for n in (20, 40, 80)],
                                "bytes_per_prompt_padded_120": t5(120) - 8}}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sections", default="read,writer,kill,ddp,text")
    parser.add_argument("--work", default=None, help="scratch directory (default: a temporary one, removed)")
    parser.add_argument("--rounds", type=int, default=60, help="timed rounds of 32 batches per read method")
    parser.add_argument("--writer-trajectories", type=int, default=1024)
    parser.add_argument("--kills", type=int, default=10)
    parser.add_argument("--kill-trajectories", type=int, default=4096)
    parser.add_argument("--kill-max-delay", type=float, default=6.0, help="seconds after the progress bar appears")
    parser.add_argument("--ddp-trajectories", type=int, default=512)
    args = parser.parse_args(argv)
    work = Path(args.work or tempfile.mkdtemp(prefix="bench_store_"))
    work.mkdir(parents=True, exist_ok=True)
    sections = args.sections.split(",")
    result = {"torch_threads": torch.get_num_threads(), "batch": BATCH}
    try:
        if "read" in sections:
            result["read_load_average_before"] = [round(x, 2) for x in os.getloadavg()]  # 1, 5, 15 min
            result["read"] = bench_read(work, args.rounds)
            result["read_load_average_after"] = [round(x, 2) for x in os.getloadavg()]
        if "writer" in sections:
            result["writer"] = bench_writer(work, args.writer_trajectories)
        if "kill" in sections:
            result["kill_resume"] = bench_kill(work, args.kills, args.kill_trajectories, args.kill_max_delay)
        if "ddp" in sections:
            result["ddp"] = bench_ddp(work, args.ddp_trajectories)
        if "text" in sections:
            result["text"] = bench_text(work)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
