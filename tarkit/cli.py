"""The ``tarkit`` executable: LightningCLI's fit/validate/test/predict plus plugin-provided commands.

Entry points are loaded *before* LightningCLI builds its parser, so a recipe can name a part by its
registered short name (``class_path: learned``), its class name, or a full class path.

Listing the commands imports nothing heavy (torch, Lightning and transformers load when a command that
needs them runs). Options before the command: ``--root DIR`` (the root of ``root:`` paths,
``$TARKIT_ROOT``) and ``--verbose`` (library tips, banners and known-harmless warnings, hidden by default).
"""

from __future__ import annotations

import contextvars
import os
import pickle
import re
import sys
import warnings
from pathlib import Path
from typing import NoReturn

from tarkit import __version__
from tarkit.commands import CommandError
from tarkit.paths import ROOT_VARIABLE
from tarkit.quiet import quiet_libraries, quiet_lightning
from tarkit.registry import TarkitPluginWarning, UnknownPartError, registry
from tarkit.threads import configure_threads

LIGHTNING_SUBCOMMANDS = {
    "fit": "train a model from a recipe",
    "validate": "run one validation epoch",
    "test": "run one test epoch",
    "predict": "run prediction (writes what the model's predict step writes)",
}

# The last unknown part name met while parsing, so a failed parse can report it on one line instead of
# jsonargparse's nested explanation of every type it tried.
_unknown_part: contextvars.ContextVar[UnknownPartError | None] = contextvars.ContextVar("unknown_part", default=None)


_default_formatwarning = warnings.formatwarning


def _format_warning(message, category, filename, lineno, line=None):  # noqa: ANN001 (warnings API)
    if issubclass(category, TarkitPluginWarning):
        return f"tarkit: warning: {message}\n"
    return _default_formatwarning(message, category, filename, lineno, line)


def install_part_resolver() -> None:
    """Teach jsonargparse to resolve registered short names (``siglip2``) to class paths.

    jsonargparse resolves a dot-less ``class_path`` only against class names of imported subclasses; this
    wraps its resolver so the registry's names work too, and unknown names raise :class:`UnknownPartError`
    naming the group and what is available.
    """
    from jsonargparse import _typehints

    original = getattr(_typehints.resolve_class_path_by_name, "__wrapped__", _typehints.resolve_class_path_by_name)

    def resolve_class_path_by_name(cls, name: str) -> str:
        class_path = original(cls, name)
        if "." in class_path or isinstance(cls, tuple) or not isinstance(cls, type):
            return class_path
        groups = registry.groups_accepting(cls)
        if not groups:
            return class_path
        resolved = registry.resolve(cls, name)
        if resolved is not None:
            return resolved
        error = UnknownPartError(groups, name, {g: sorted(registry.load_group(g)) for g in groups})
        _unknown_part.set(error)
        raise error

    resolve_class_path_by_name.__wrapped__ = original
    _typehints.resolve_class_path_by_name = resolve_class_path_by_name


# jsonargparse explains a refused value as a tree (each type it tried, the value it got); one line keeps the keys
# down to the innermost complaint.
_NOISE = ("Does not validate", "Subtypes:", "Errors:", "Given value", "Problem with given", "Expected a <class 'None")


def parse_error_line(message: str) -> str:
    """A parse error of jsonargparse on one line: ``key.init_args.key: complaint``."""
    keys, said = [], []
    for line in message.splitlines():
        text = line.strip().removeprefix("- ")
        if key := re.match(r'Parser key "([^"]+)":\s*', text):
            keys, text = [*keys, key[1]], text[key.end() :]
        said += [text] if text and not text.startswith(_NOISE) else []
    return ".init_args.".join(keys) + ": " * bool(keys) + " ".join(said)


def _config_files(args: list[str]) -> list[Path]:
    """The ``--config`` files named on a Lightning command line (both ``--config F`` and ``--config=F``)."""
    files = [Path(b) for a, b in zip(args, args[1:], strict=False) if a == "--config"]
    return files + [Path(a.removeprefix("--config=")) for a in args if a.startswith("--config=")]


def _lightning_cli(args: list[str], verbose: bool) -> None:
    from jsonargparse import Namespace
    from lightning.pytorch import LightningDataModule, LightningModule
    from lightning.pytorch.callbacks import ModelCheckpoint, ProgressBar, RichProgressBar
    from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
    from lightning.pytorch.plugins.io import CheckpointIO

    from tarkit.checkpoints import load_checkpoint
    from tarkit.pretrained import PretrainedLoadError
    from tarkit.recipe_paths import MissingStageError, check_inputs, resolve_root_paths
    from tarkit.resumable import AtomicCheckpointIO, StepSeeds
    from tarkit.run_logging import default_callbacks, default_checkpoint, default_loggers

    if not verbose:
        quiet_lightning()

    # A missing `root:` input names the recipe that writes it: look beside the recipes given, then recipes/.
    recipe_dirs = dict.fromkeys([f.parent for f in _config_files(args)] + [Path("recipes/tiny"), Path("recipes")])

    def fail(message: str) -> NoReturn:
        print(f"tarkit: error: {message}", file=sys.stderr)
        raise SystemExit(2)

    for recipe in _config_files(args):
        try:
            recipe.is_file() and recipe.read_bytes().decode("utf-8")
        except UnicodeDecodeError as err:
            fail(f"{recipe} is not UTF-8 ({err.reason} at byte {err.start}); save the recipe as UTF-8")

    class TarkitArgumentParser(LightningArgumentParser):
        def error(self, message: str, ex: Exception | None = None):  # noqa: ANN201 (argparse API)
            unknown = _unknown_part.get()
            # Nested parsers (exit_on_error off) raise for jsonargparse to try the next type; TARKIT_DEBUG: all.
            if unknown is not None or (self.exit_on_error and not os.environ.get("TARKIT_DEBUG")):
                fail(unknown or f"{parse_error_line(message)}; fix the recipe (`tarkit {args[0]} --help` lists keys)")
            super().error(message, ex)

    class TarkitCLI(LightningCLI):
        def init_parser(self, **kwargs):  # noqa: ANN201 (LightningCLI API)
            parser = super().init_parser(**kwargs)  # keeps Lightning's --config and dump header
            parser.__class__ = TarkitArgumentParser
            return parser

        def _parse_ckpt_path(self) -> None:
            # Lightning reads a --ckpt_path file for its hyper-parameters right after parsing: check it first.
            self.check_checkpoint(self.config.get(self.config.get("subcommand") or "") or {})
            super()._parse_ckpt_path()

        def check_checkpoint(self, config: Namespace) -> None:
            """Read a --ckpt_path file memory-mapped and weights-only: a pickled object or a damaged file is one
            line, not a traceback (unless --weights_only false: the user's call)."""
            path = str(config.get("ckpt_path") or "")  # Lightning's own names and URLs are Lightning's to read
            mine = path and path not in ("best", "last", "hpc") and not path.startswith(("registry", "root:"))
            if config.get("weights_only") is not False and mine and "://" not in path:
                try:
                    load_checkpoint(path, mmap=True)
                except PretrainedLoadError as err:
                    fail(str(err))

        def before_instantiate_classes(self) -> None:
            config = self.config[self.subcommand]
            try:
                check_inputs(config, recipe_dirs)
            except MissingStageError as err:
                fail(str(err))
            resolve_root_paths(config)
            self.check_checkpoint(config)  # again: a root: path is a file only now
            # torch's default, made explicit: TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD may not turn it off, --weights_only may.
            config["weights_only"] = True if config.get("weights_only") is None else config["weights_only"]
            data = config.get("data") or {}
            configure_threads(workers=int((data.get("init_args") or {}).get("num_workers") or 0))

        def instantiate_trainer(self, **kwargs):  # noqa: ANN201 (LightningCLI API)
            # Runs leave curves and something to resume from: a recipe that keeps Lightning's default logger
            # gets CSV (+ TensorBoard), the learning rate and throughput, one that keeps checkpointing on gets
            # <run>/checkpoints; a recipe that turns either off, or brings its own, is left alone. Every run
            # seeds its steps and writes checkpoints atomically (tarkit.resumable) so a killed run resumes exactly.
            trainer = self._get(self.config_init, "trainer", default={})
            run_dir = trainer.get("default_root_dir") or os.getcwd()
            callbacks = trainer.get("callbacks") or []
            callbacks = list(callbacks) if isinstance(callbacks, list) else [callbacks]
            if trainer.get("logger") in (None, True):
                kwargs.setdefault("logger", default_loggers(run_dir))
            if kwargs.get("logger", trainer.get("logger")) not in (None, False):
                callbacks += default_callbacks()
            if trainer.get("enable_checkpointing") is not False and not any(
                isinstance(c, ModelCheckpoint) for c in callbacks
            ):
                callbacks.append(default_checkpoint(run_dir))
            callbacks.append(StepSeeds())
            plugins = trainer.get("plugins") or []
            plugins = list(plugins) if isinstance(plugins, list) else [plugins]
            if not any(isinstance(p, CheckpointIO) for p in plugins):
                kwargs["plugins"] = [*plugins, AtomicCheckpointIO()]
            if trainer.get("enable_progress_bar") is not False and not any(
                isinstance(c, ProgressBar) for c in callbacks
            ):
                callbacks.append(RichProgressBar())
            return super().instantiate_trainer(callbacks=callbacks, **kwargs)

        def instantiate_classes(self) -> None:
            # A constructor refusing its arguments (a bad value, a missing file) is the user's to fix: say
            # what it said, on one line, instead of jsonargparse's nested report. TARKIT_DEBUG=1 shows all.
            try:
                super().instantiate_classes()
            except (ValueError, TypeError, OSError) as err:
                if os.environ.get("TARKIT_DEBUG"):
                    raise
                root = err
                while root.__cause__ is not None or (root.__context__ is not None and not root.__suppress_context__):
                    root = root.__cause__ or root.__context__
                fail(f"the recipe's parts could not be built: {' '.join(str(root).split()) or type(root).__name__}")

    registry.load_all()
    install_part_resolver()
    _unknown_part.set(None)
    # LightningCLI reads sys.argv when given no args and warns when both differ; the options tarkit took off
    # the front (--root, --verbose) are not Lightning's, so it sees exactly the arguments meant for it.
    command_line, sys.argv = sys.argv, [sys.argv[0], *args]
    try:
        TarkitCLI(
            LightningModule,
            LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            seed_everything_default=0,
            save_config_kwargs={"overwrite": True},
        )
    except pickle.UnpicklingError as err:  # a checkpoint Lightning found itself (--ckpt_path last, best) holds code
        detail = " ".join(str(err).split())[:160]
        fail(f"the checkpoint to resume from holds more than tensors, refused unread ({detail}); use one you trust")
    finally:
        sys.argv = command_line


def _help(commands: dict[str, type]) -> str:
    lines = [
        f"usage: tarkit [--version] [-h] [--root DIR] [--verbose] <command> ...  (tarkit {__version__})",
        "",
        "Tar (Vision as a Dialect) as a plugin framework on PyTorch Lightning.",
        "",
        "options:",
        f"  --root DIR  root of the recipes' root: paths (default ${ROOT_VARIABLE}, else outputs/tiny)",
        "  --verbose   show library tips, banners and known-harmless warnings",
        "",
        "commands:",
    ]
    lines += [f"  {name:<10} {text}" for name, text in LIGHTNING_SUBCOMMANDS.items()]
    lines += [f"  {name:<10} {cls.help}" for name, cls in commands.items() if name not in LIGHTNING_SUBCOMMANDS]
    lines += ["", "`tarkit <command> --help` describes one command; recipes live in recipes/."]
    return "\n".join(lines)


def _global_options(argv: list[str]) -> tuple[list[str], bool]:
    """Apply ``--root DIR`` and ``--verbose`` given before the command; returns the rest and ``verbose``."""
    verbose = False
    while argv and (argv[0] in ("--root", "--verbose") or argv[0].startswith("--root=")):
        option = argv.pop(0)
        if option == "--verbose":
            verbose = True
            continue
        root = option.removeprefix("--root=") if option.startswith("--root=") else (argv.pop(0) if argv else "")
        if not root:
            raise CommandError("--root needs a folder: tarkit --root DIR <command> ...")
        os.environ[ROOT_VARIABLE] = root
    return argv, verbose


def main(argv: list[str] | None = None) -> int:
    """Run ``tarkit``; returns the process exit status.

    ``--root`` holds for this call only: an in-process caller (``tarkit demo`` running its stages, a test)
    gets its environment back afterwards.
    """
    root_before = os.environ.get(ROOT_VARIABLE)
    try:
        return _run(list(sys.argv[1:] if argv is None else argv))
    finally:
        if root_before is None:
            os.environ.pop(ROOT_VARIABLE, None)
        else:
            os.environ[ROOT_VARIABLE] = root_before


def _run(argv: list[str]) -> int:
    warnings.formatwarning = _format_warning
    try:
        argv, verbose = _global_options(argv)
    except CommandError as err:
        print(f"tarkit: error: {err}", file=sys.stderr)
        return 2
    if argv[:1] == ["--version"]:
        print(f"tarkit {__version__}")
        return 0
    if not verbose and argv and argv[0] not in ("-h", "--help"):
        quiet_libraries()
    if argv and argv[0] in LIGHTNING_SUBCOMMANDS:
        _lightning_cli(argv, verbose)
        return 0
    commands = registry.load_group("tarkit.commands")
    if not argv or argv[0] in ("-h", "--help"):
        print(_help(commands))
        return 0
    name, rest = argv[0], argv[1:]
    if name not in commands:
        known = ", ".join([*LIGHTNING_SUBCOMMANDS, *commands])
        print(f"tarkit: error: unknown command {name!r}; commands are: {known}", file=sys.stderr)
        return 2
    try:
        return commands[name]().run(rest, prog=f"tarkit {name}")
    except CommandError as err:
        print(f"tarkit {name}: error: {err}", file=sys.stderr)
        return 2
