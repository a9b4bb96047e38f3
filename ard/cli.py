"""The `ard` command: a LightningCLI (`ard fit|validate|test|predict -c CONFIG.yaml`).

The LightningModule and LightningDataModule are chosen by `class_path` in the YAML. The resolved
config is saved into every run's own directory (`<save_dir>/<name>/<version>/config.yaml`, the
directory Lightning also puts that run's logger files in), so a second run never collides with the
first, and only once the run is accepted (after the checkpoint is restored), so a rejected run writes
nothing. Resuming loads the checkpoint weights-only and compares hyperparameters (`ard.checkpoints`;
`--resume.override true` accepts changed ones). W&B runs offline unless the config or the command line
sets `offline: false`.
"""
from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import lightning as L
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback

from ard.checkpoints import ResumeCheck
from ard.checks import check_writable

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
    """Save the resolved config as `<run_dir>/config.yaml` (a new directory for every run), once the run is
    accepted: when its loop starts, after the checkpoint was restored, so a rejected run writes nothing."""

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


class ARDCLI(LightningCLI):
    def __init__(self, args=None, **kwargs):
        super().__init__(
            model_class=L.LightningModule, datamodule_class=L.LightningDataModule,
            subclass_mode_model=True, subclass_mode_data=True,
            save_config_callback=SaveConfigPerRun, auto_configure_optimizers=False,
            parser_class=OneLineErrorParser,
            args=args, **kwargs,
        )

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(ResumeCheck, "resume")  # --resume.override true: see ard.checkpoints

    def before_instantiate_classes(self) -> None:
        """Derive per-run paths from `trainer.default_root_dir` (the run root) unless set explicitly:
        W&B / logger files in `<root>`, checkpoints in `<root>/checkpoints` (so re-running the same
        command finds `last.ckpt` and resumes)."""
        cfg = self.config[self.subcommand] if self.subcommand else self.config
        root = cfg.trainer.default_root_dir or "."
        check_writable(root, "trainer.default_root_dir")
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
