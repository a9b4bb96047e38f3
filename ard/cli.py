"""The `ard` command: a LightningCLI (`ard fit|validate|test|predict -c CONFIG.yaml`).

The LightningModule and LightningDataModule are chosen by `class_path` in the YAML. The resolved
config is saved into every run's own directory (`<save_dir>/<name>/<version>/config.yaml`, the
directory Lightning also puts that run's logger files in), so a second run never collides with the
first. Resuming loads the checkpoint weights-only and compares hyperparameters (`ard.checkpoints`;
`--resume.override true` accepts changed ones). W&B runs offline unless the config or the command line
sets `offline: false`.

`ard fit` has one writer per run directory: global rank 0 locks `trainer.default_root_dir` (`ard.runlock`)
before anything is built, so a second fit there stops in one line naming the first. A run refused before
its first optimiser step (at setup, at its first batch or step: a bad store, a refused resume, a non-finite
first loss) leaves no trace: what it added to the run directory (logger and W&B directories, config.yaml, the
directory itself) is removed and the W&B symlinks it re-pointed are restored (`RunDirectory`).
"""
from __future__ import annotations

import os
import re
import shutil
import sys
import time
from pathlib import Path

import lightning as L
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback

from ard.checkpoints import ResumeCheck
from ard.checks import check_writable
from ard.runlock import LOCK_NAME, DirectoryLock, is_global_rank_zero

_NOISE = ("Does not validate", "Subtypes:", "Errors:", "Given value", "Expected a <class 'NoneType'>",
          "Problem with given class_path", "tip:")
_KEY = re.compile(r'^Parser key "([^"]+)":$')


def one_line(message: str) -> str:
    """jsonargparse's nested error as one line: the dotted key, then every reason (with the bad value and
    the accepted ones) in order, most general first."""
    lines = [line.strip().lstrip("- ").strip() for line in message.splitlines()]
    keys = [m.group(1) for m in map(_KEY.match, lines) if m]
    reasons = list(dict.fromkeys(line for line in lines if line and not _KEY.match(line) and not line.startswith(_NOISE)))
    return "; ".join(([f'key "{".".join(keys)}"'] if keys else []) + reasons)


def check_config_files(args: list[str]) -> None:
    """Every `-c/--config FILE` given is readable YAML (jsonargparse's own message does not name the file)."""
    import yaml

    files = [b for a, b in zip(args, args[1:]) if a in ("-c", "--config")]
    files += [a.split("=", 1)[1] for a in args if a.startswith("--config=")]
    for name in files:
        try:
            yaml.safe_load(Path(name).read_text())
        except FileNotFoundError:
            raise FileNotFoundError(f"config file not found: {name}") from None
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"{name}: config file not readable ({e})") from None
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            raise ValueError(f"{name}: invalid YAML{where}: {getattr(e, 'problem', None) or e}") from None


class OneLineErrorParser(LightningArgumentParser):
    """Bad config (unknown key, wrong type, missing file) -> `ard: error: <one line>` and exit 2."""

    def error(self, message: str, ex: Exception | None = None):
        if not self.exit_on_error:
            return super().error(message, ex)
        print(f"ard: error: {one_line(message)}", file=sys.stderr)
        self.exit(2)


def run_dir(trainer: L.Trainer) -> Path:
    """This run's own directory: `<save_dir>/<name>/<version>`, as Lightning lays out checkpoints."""
    logger = trainer.logger
    if logger is None:
        return Path(trainer.default_root_dir)
    save_dir = logger.save_dir or trainer.default_root_dir
    version = logger.version if isinstance(logger.version, str) else f"version_{logger.version}"
    return Path(save_dir) / str(logger.name) / version


class SaveConfigPerRun(SaveConfigCallback):
    """Save the resolved config as `<run_dir>/config.yaml` (a new directory for every run) when the run's loop
    starts, after the checkpoint was restored and checked (a run refused later, before its first step, has it
    removed with the rest of what it wrote: `RunDirectory`)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **{**kwargs, "save_to_log_dir": False})

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        pass  # too early: the checkpoint and the store are not checked yet

    def _save_once(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().setup(trainer, pl_module, trainer.state.fn.value)

    on_train_start = on_validation_start = on_test_start = on_predict_start = _save_once

    def save_config(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if not trainer.is_global_zero:
            return
        path = run_dir(trainer) / self.config_filename
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        self.parser.save(self.config, tmp, skip_none=False, overwrite=True, multifile=False)
        os.replace(tmp, path)


class FirstStep(L.Callback):
    """Whether this process completed an optimiser step (a resumed run counts from its checkpoint's step)."""

    def __init__(self):
        self.start: int | None = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.start = trainer.global_step

    def done(self, trainer: L.Trainer) -> bool:
        return self.start is not None and trainer.global_step > self.start


def _entries(root: Path) -> dict[str, str | None]:
    """The entries of `root` down to depth 2 (relative path -> symlink target, None for other entries), the
    lock file excepted."""
    entries = {}
    for top in root.iterdir():
        if top.name == LOCK_NAME:
            continue
        entries[top.name] = os.readlink(top) if top.is_symlink() else None
        if top.is_dir() and not top.is_symlink():
            for child in top.iterdir():
                entries[f"{top.name}/{child.name}"] = os.readlink(child) if child.is_symlink() else None
    return entries


class RunDirectory:
    """A fit's run directory (`trainer.default_root_dir`), locked while the run lasts; `discard` takes back
    what the run added or re-pointed there down to depth 2 (logger versions, W&B runs and their `latest-run` /
    `debug.log` symlinks, config.yaml), so a refused run leaves the directory as it found it."""

    def __init__(self, root: Path):
        self.root = root
        self.lock = DirectoryLock(root, "trainer.default_root_dir").acquire()
        self.before = _entries(root)  # taken under the lock: no other run adds anything now
        self.started_ns = time.time_ns()

    def wrote_checkpoint(self) -> bool:
        """Whether a checkpoint was saved since the lock was taken (ModelCheckpoint's save_on_exception)."""
        return any(p.stat().st_mtime_ns >= self.started_ns for p in self.root.rglob("*.ckpt") if p.is_file())

    def discard(self) -> None:
        """Finish an open W&B run (its files are open; offline it ends at once), then remove the entries this
        run added and restore the symlinks it changed. Files changed in place are not restored: nothing
        rewrites an existing file before the first optimiser step."""
        wandb = sys.modules.get("wandb")
        if wandb is not None and wandb.run is not None:
            wandb.run.finish(exit_code=1)
        after = _entries(self.root)
        for name in sorted(set(after) - set(self.before)):  # parents sort before their children
            path = self.root / name
            if not os.path.lexists(path):  # inside a directory removed just before
                continue
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
        for name, target in self.before.items():
            path = self.root / name
            if target is not None and (not path.is_symlink() or os.readlink(path) != target):
                if os.path.lexists(path):
                    path.unlink()
                path.symlink_to(target)


class ARDCLI(LightningCLI):
    """The `ard` LightningCLI: per-run paths under `trainer.default_root_dir`, the resume check, one-line errors,
    and for `fit` the run directory's lock and the removal of a refused run's files (`RunDirectory`)."""

    def __init__(self, args=None, **kwargs):
        self.run_directory: RunDirectory | None = None  # fit on global rank 0: locked in before_instantiate_classes
        self.first_step = FirstStep()
        try:
            super().__init__(
                model_class=L.LightningModule, datamodule_class=L.LightningDataModule,
                subclass_mode_model=True, subclass_mode_data=True,
                save_config_callback=SaveConfigPerRun, auto_configure_optimizers=False,
                parser_class=OneLineErrorParser,
                args=args, **kwargs,
            )
        except BaseException:  # a refusal, a crash or Ctrl-C
            if self.run_directory is not None and self.refused():
                self.run_directory.discard()
            raise
        finally:
            if self.run_directory is not None:
                self.run_directory.lock.release()

    def refused(self) -> bool:
        """Whether the failed fit was refused: it completed no optimiser step and saved no checkpoint."""
        trainer = getattr(self, "trainer", None)  # None: failed before the trainer was made
        stepped = trainer is not None and self.first_step.done(trainer)
        return not stepped and not self.run_directory.wrote_checkpoint()

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(ResumeCheck, "resume")  # --resume.override true: see ard.checkpoints

    def before_fit(self) -> None:
        self.trainer.callbacks.append(self.first_step)  # tells `refused` whether a step was taken

    def before_instantiate_classes(self) -> None:
        """Derive per-run paths from `trainer.default_root_dir` (the run root) unless set explicitly:
        W&B / logger files in `<root>`, checkpoints in `<root>/checkpoints` (so re-running the same
        command finds `last.ckpt` and resumes)."""
        cfg = self.config[self.subcommand] if self.subcommand else self.config
        root = cfg.trainer.default_root_dir or "."
        check_writable(root, "trainer.default_root_dir")
        if self.subcommand == "fit" and is_global_rank_zero():
            self.run_directory = RunDirectory(Path(root))
        loggers = cfg.trainer.logger if isinstance(cfg.trainer.logger, list) else [cfg.trainer.logger]
        for logger in loggers:
            args = getattr(logger, "init_args", None)
            if args is not None and "save_dir" in args and args.save_dir in (None, "."):
                args.save_dir = root
        for callback in cfg.trainer.callbacks or []:
            args = getattr(callback, "init_args", None)
            if callback.class_path.endswith("ModelCheckpoint") and args.dirpath is None:
                args.dirpath = str(Path(root) / "checkpoints")


def main(args: list[str] | None = None) -> None:
    os.environ.setdefault("WANDB_SILENT", "true")
    try:
        check_config_files(sys.argv[1:] if args is None else args)
        ARDCLI(args=args)
    except (FileNotFoundError, ValueError) as e:  # our own one-line errors: no traceback
        print(f"ard: error: {one_line(str(e))}", file=sys.stderr)
        raise SystemExit(2) from None
    except RuntimeError as e:  # weights that do not fit the model (a resume with --resume.override true)
        if not str(e).startswith("Error(s) in loading state_dict"):
            raise
        print(f"ard: error: the checkpoint's weights do not fit this model: {one_line(str(e))[:300]}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
