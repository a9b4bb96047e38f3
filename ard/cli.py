"""The `ard` command: a LightningCLI (`ard fit|validate|test|predict -c CONFIG.yaml`).

The LightningModule and LightningDataModule are chosen by `class_path` in the YAML. The resolved
config is saved into every run's own directory (`<save_dir>/<name>/<version>/config.yaml`, the
directory Lightning also puts that run's logger files in), so a second run never collides with the
first. W&B runs offline unless the config or the command line sets `offline: false`.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import lightning as L
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback

_NOISE = ("Does not validate", "Subtypes:", "Errors:", "Given value", "Expected a <class 'NoneType'>",
          "Problem with given class_path", "tip:")


def one_line(message: str) -> str:
    """jsonargparse's nested error as one line: the key, then its most specific reason."""
    lines = [line.strip().lstrip("- ") for line in message.splitlines()]
    return " ".join([line for line in lines if line and not line.startswith(_NOISE)][:2])


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
    """Save the resolved config as `<run_dir>/config.yaml` (a new directory for every run)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **{**kwargs, "save_to_log_dir": False})

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


    def before_instantiate_classes(self) -> None:
        """Derive per-run paths from `trainer.default_root_dir` (the run root) unless set explicitly:
        W&B / logger files in `<root>`, checkpoints in `<root>/checkpoints` (so re-running the same
        command finds `last.ckpt` and resumes)."""
        cfg = self.config[self.subcommand] if self.subcommand else self.config
        root = cfg.trainer.default_root_dir or "."
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
        ARDCLI(args=args)
    except (FileNotFoundError, ValueError) as e:  # our own one-line errors: no traceback
        print(f"ard: error: {one_line(str(e))}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
