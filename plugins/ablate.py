"""``tarkit ablate SPEC``: run every variant of an ablation with the same seed and budget, then print one table.

A spec is YAML with a ``base`` recipe and ``variants``, each a list of layer files put on top of the base
(see ``recipes/ablations/``). Each variant runs ``tarkit fit --config base --config layer...`` with a CSV
logger under ``<out>/<variant>``; the table holds every metric each run logged last under ``val/`` (or the
prefix given), in markdown and in ``<out>/results.json``.
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path
from typing import Any

import yaml

from tarkit.commands import Command, CommandError


def read_spec(path: Path) -> tuple[str, dict[str, list[str]]]:
    """``(base, {variant: layers})`` of an ablation spec, with the problem named when it is malformed."""
    try:
        spec = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as err:
        raise CommandError(f"cannot read ablation spec {path}: {err}") from err
    if not (isinstance(spec, dict) and isinstance(spec.get("base"), str) and isinstance(spec.get("variants"), dict)):
        raise CommandError(f"{path}: an ablation spec needs 'base: <recipe>' and 'variants: {{name: [layers]}}'")
    variants = {}
    for name, layers in spec["variants"].items():
        layers = [layers] if isinstance(layers, str) else layers
        if not isinstance(layers, list) or not all(isinstance(layer, str) for layer in layers):
            raise CommandError(f"{path}: variant {name!r} must list layer files")
        variants[str(name)] = layers
    if not variants:
        raise CommandError(f"{path}: no variants")
    missing = [f for f in [spec["base"], *(f for layers in variants.values() for f in layers)] if not Path(f).is_file()]
    if missing:
        raise CommandError(f"{path}: recipe file(s) not found: {', '.join(missing)} (run from the repository root)")
    return spec["base"], variants


def last_logged(metrics_csv: Path, prefix: str) -> dict[str, float]:
    """The last value logged for each column of a Lightning ``metrics.csv`` that starts with ``prefix``."""
    values: dict[str, float] = {}
    with metrics_csv.open() as handle:
        for row in csv.DictReader(handle):
            for key, value in row.items():
                if key.startswith(prefix) and value not in ("", None):
                    values[key] = float(value)
    return values


def comparison_table(results: dict[str, dict[str, float]]) -> str:
    """Markdown: one row per metric, one column per variant."""
    names = list(results)
    metrics = sorted({m for values in results.values() for m in values})
    lines = ["| metric | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for metric in metrics:
        cells = [f"{results[n][metric]:.4f}" if metric in results[n] else "-" for n in names]
        lines.append(f"| {metric} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


class AblateCommand(Command):
    """``tarkit ablate SPEC [--max-steps N] [--out DIR] [-- extra fit arguments]``."""

    help = "run each variant of an ablation spec with the same seed/budget and print one comparison table"

    def run(self, argv: list[str], prog: str) -> int:
        from tarkit.cli import main as tarkit_main

        parser = argparse.ArgumentParser(prog=prog, description=self.help)
        parser.add_argument("spec", type=Path, help="ablation spec, e.g. recipes/ablations/codebook.yaml")
        parser.add_argument("--out", type=Path, help="output folder (default outputs/ablations/<spec name>)")
        parser.add_argument("--max-steps", type=int, help="training steps of every variant (default: the recipe's)")
        parser.add_argument("--metric-prefix", default="val/", help="which logged metrics to compare")
        parser.add_argument("--variants", nargs="+", help="run only these variants")
        parser.epilog = "Arguments after -- go to every variant's `tarkit fit`."
        split = argv.index("--") if "--" in argv else len(argv)
        args, extra = parser.parse_args(argv[:split]), argv[split + 1 :]
        base, variants = read_spec(args.spec)
        if args.variants:
            unknown = sorted(set(args.variants) - set(variants))
            if unknown:
                raise CommandError(f"unknown variant(s) {', '.join(unknown)}; {args.spec} has {', '.join(variants)}")
            variants = {name: variants[name] for name in args.variants}
        out = args.out or Path("outputs/ablations") / args.spec.stem
        if args.max_steps is not None:
            # validate at the last step, so a budget below the recipe's validation interval still compares
            extra += [f"--trainer.max_steps={args.max_steps}", f"--trainer.val_check_interval={args.max_steps}"]
        results: dict[str, dict[str, Any]] = {}
        for name, layers in variants.items():
            run_dir = out / name
            print(f"[ablate] {name}: {' + '.join([base, *layers])}", flush=True)
            fit = ["fit", "--config", base, *[x for layer in layers for x in ("--config", layer)]]
            fit += [
                f"--trainer.default_root_dir={run_dir}",
                "--trainer.logger=lightning.pytorch.loggers.CSVLogger",
                f"--trainer.logger.init_args.save_dir={run_dir}",
                "--trainer.logger.init_args.name=logs",
                "--trainer.logger.init_args.version=0",
                f"--model.init_args.export_dir={run_dir / 'export'}",
                *extra,
            ]
            try:
                tarkit_main(fit)
            except SystemExit as err:
                raise CommandError(f"variant {name} failed (exit status {err.code})") from err
            metrics_csv = run_dir / "logs" / "version_0" / "metrics.csv"
            if not metrics_csv.is_file():
                raise CommandError(f"variant {name} logged nothing to {metrics_csv}; does the recipe validate?")
            results[name] = last_logged(metrics_csv, args.metric_prefix)
        table = comparison_table(results)
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps({"spec": str(args.spec), "results": results}, indent=2) + "\n")
        (out / "results.md").write_text(table + "\n")
        print(table)
        print(f"\n[ablate] results in {out / 'results.json'} and {out / 'results.md'}")
        return 0
