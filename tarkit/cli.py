"""The ``tarkit`` executable: LightningCLI's fit/validate/test/predict plus plugin-provided commands.

Entry points are loaded *before* LightningCLI builds its parser, so a recipe can name a part by its
registered short name (``class_path: learned``), its class name, or a full class path.
"""

from __future__ import annotations

import contextvars
import os
import sys
import warnings

from tarkit import __version__
from tarkit.commands import CommandError
from tarkit.registry import TarkitPluginWarning, UnknownPartError, registry

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


def _lightning_cli(args: list[str] | None) -> None:
    from lightning.pytorch import LightningDataModule, LightningModule
    from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

    class TarkitArgumentParser(LightningArgumentParser):
        def error(self, message: str, ex: Exception | None = None):  # noqa: ANN201 (argparse API)
            unknown = _unknown_part.get()
            if unknown is not None:
                self.exit(2, f"tarkit: error: {unknown}\n")
            super().error(message, ex)

    class TarkitCLI(LightningCLI):
        def init_parser(self, **kwargs):  # noqa: ANN201 (LightningCLI API)
            parser = super().init_parser(**kwargs)  # keeps Lightning's --config and dump header
            parser.__class__ = TarkitArgumentParser
            return parser

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
                message = " ".join(str(root).split()) or type(root).__name__
                print(f"tarkit: error: the recipe's parts could not be built: {message}", file=sys.stderr)
                raise SystemExit(2) from None

    registry.load_all()
    install_part_resolver()
    _unknown_part.set(None)
    TarkitCLI(
        LightningModule,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        seed_everything_default=0,
        save_config_kwargs={"overwrite": True},
        args=args,
    )


def _help(commands: dict[str, type]) -> str:
    lines = [
        f"usage: tarkit [--version] [-h] <command> ...  (tarkit {__version__})",
        "",
        "Tar (Vision as a Dialect) as a plugin framework on PyTorch Lightning.",
        "",
        "commands:",
    ]
    lines += [f"  {name:<10} {text}" for name, text in LIGHTNING_SUBCOMMANDS.items()]
    lines += [f"  {name:<10} {cls.help}" for name, cls in commands.items() if name not in LIGHTNING_SUBCOMMANDS]
    lines += ["", "`tarkit <command> --help` describes one command; recipes live in recipes/."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run ``tarkit``; returns the process exit status."""
    from_command_line = argv is None
    argv = list(sys.argv[1:] if from_command_line else argv)
    warnings.formatwarning = _format_warning
    if argv[:1] == ["--version"]:
        print(f"tarkit {__version__}")
        return 0
    if argv and argv[0] in LIGHTNING_SUBCOMMANDS:
        _lightning_cli(None if from_command_line else argv)  # LightningCLI reads sys.argv itself
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
