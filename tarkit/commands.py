"""Sub-commands of the ``tarkit`` executable besides Lightning's fit/validate/test/predict.

A plugin adds one by registering a :class:`Command` subclass under the ``tarkit.commands`` group.
"""

from __future__ import annotations

import argparse
import json
from abc import ABC, abstractmethod

from tarkit.registry import GROUPS, registry


class CommandError(Exception):
    """Bad input to a command: the CLI prints the message on one line and exits with status 2."""


class Command(ABC):
    """A ``tarkit <name>`` sub-command: ``help`` is its line in ``tarkit --help``."""

    help: str = ""

    @abstractmethod
    def run(self, argv: list[str], prog: str) -> int:
        """Run with the arguments after the command name; return the exit status."""


class PluginsCommand(Command):
    """``tarkit plugins``: every group, registered name, class path and distribution.

    The listing reads the installed distributions' metadata only (fast: nothing is imported); ``--check``
    also imports every plugin, warns about each that fails and marks it broken.
    """

    help = "list installed plugins: group, name, class and distribution"

    def run(self, argv: list[str], prog: str) -> int:
        parser = argparse.ArgumentParser(prog=prog, description=self.help)
        parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
        parser.add_argument("--check", action="store_true", help="import every plugin and flag the broken ones")
        args = parser.parse_args(argv)
        rows = []
        for group in GROUPS:
            loaded = registry.load_group(group) if args.check else None  # a broken plugin warns
            for name, entry in registry.entries(group).items():
                status = "unchecked" if loaded is None else "ok" if name in loaded else "broken"
                rows.append(
                    {
                        "group": group,
                        "name": name,
                        "class_path": entry.class_path,
                        "distribution": entry.distribution,
                        "status": status,
                    }
                )
        if args.json:
            print(json.dumps(rows, indent=2))
            return 0
        for group in GROUPS:
            print(group)
            members = [r for r in rows if r["group"] == group]
            if not members:
                print("  (none)")
            for r in members:
                flag = "  [broken: see warning]" if r["status"] == "broken" else ""
                print(f"  {r['name']:<20} {r['class_path']:<55} ({r['distribution']}){flag}")
        return 0
