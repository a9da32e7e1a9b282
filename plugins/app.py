"""``tarkit app``: a Gradio web app on a Tar bundle: ask about an image, generate one, edit one.

Only argument parsing and the checks that need no model live here: ``tarkit --help`` imports this module to
list the commands, so gradio and torch are imported when the command runs (:mod:`tarkit_plugins.app_ui`).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from tarkit.commands import Command, CommandError

DEMO_CHECKPOINTS = Path("outputs/demo/checkpoints")
MISSING_GRADIO = "gradio is not installed; the app needs the app extra: pip install 'tarkit[app]'"


def model_folders(args: argparse.Namespace) -> dict[str, Path | None]:
    """The LM, TA-Tok and de-tokenizer folders: those given, the rest from ``--bundle``; a missing one is a
    :class:`CommandError` naming the folder and how to make it. The TA-Tok is ``None`` when the bundle has no
    ``tatok/`` and the LM records one (the pipelines find it)."""
    given = {name: getattr(args, name) for name in ("lm", "tatok", "detokenizer")}
    for name, folder in given.items():
        if folder is not None and not folder.exists():
            raise CommandError(f"--{name} {folder} does not exist")
    if all(folder is not None for folder in given.values()):
        return given
    bundle: Path = args.bundle
    how = (
        "`make demo` makes them, or pass --bundle DIR"
        if bundle == DEMO_CHECKPOINTS
        else "pass --bundle a folder holding lm/, tatok/ and a de-tokenizer"
    )
    if not bundle.is_dir():
        raise CommandError(f"no checkpoints in {bundle} (the folder does not exist); {how}")
    from tarkit_plugins.pipelines import bundle_parts

    try:
        parts = bundle_parts(bundle, detokenizer=given["detokenizer"] is None, given=[n for n, f in given.items() if f])
    except (FileNotFoundError, ValueError) as err:
        raise CommandError(f"{err} ({how})") from err
    return {name: given[name] or parts.get(name) for name in given}


class AppCommand(Command):
    """``tarkit app``: serve the Gradio app (:mod:`tarkit_plugins.app_ui`) until interrupted."""

    help = "serve a web app on a Tar bundle: ask about an image, generate, edit (needs tarkit[app])"

    def run(self, argv: list[str], prog: str) -> int:
        parser = argparse.ArgumentParser(prog=prog, description=self.help)
        parser.add_argument(
            "--bundle", type=Path, default=DEMO_CHECKPOINTS, help="folder holding lm/, tatok/ and a de-tokenizer"
        )
        parser.add_argument("--lm", type=Path, help="LM folder (default: <bundle>/lm)")
        parser.add_argument("--tatok", type=Path, help="TA-Tok folder (default: <bundle>/tatok, else the LM's record)")
        parser.add_argument("--detokenizer", type=Path, help="de-tokenizer folder (default: the one in <bundle>)")
        parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
        parser.add_argument("--port", type=int, default=7860)
        parser.add_argument("--share", action="store_true", help="also serve through a public gradio.live link")
        args = parser.parse_args(argv)
        try:
            import gradio  # noqa: F401 (only whether it is installed)
        except ImportError as err:
            raise CommandError(MISSING_GRADIO) from err
        folders = model_folders(args)
        from tarkit.threads import configure_threads
        from tarkit_plugins.app_ui import Models, build_app, serve

        configure_threads()  # the app runs beside whatever else the machine does, like a training
        print(f"[app] loading {', '.join(str(f) for f in folders.values() if f is not None)}", flush=True)
        models = Models.load(folders["lm"], folders["tatok"], folders["detokenizer"])
        serve(build_app(models), host=args.host, port=args.port, share=args.share)
        return 0
