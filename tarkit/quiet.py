"""Silencing what Lightning, transformers and torch print on every run but that never needs the user.

``tarkit --verbose`` skips this: the tips, device banners, known-harmless warnings and loading bars come back.
"""

from __future__ import annotations

import logging
import os
import warnings

# Messages that are known to be harmless for tarkit's runs, matched at the start of the warning text.
HARMLESS_WARNINGS = (
    # Lightning's own pytree helper on torch >= 2.9; nothing tarkit can change.
    r".*isinstance\(treespec, LeafSpec\)",
    # Frozen parts (the teacher, a frozen TA-Tok) are kept in eval mode on purpose.
    r"Found \d+ module\(s\) in eval mode",
    # The tiny recipes run on CPU and read in the main process.
    r"The '\w+_dataloader' does not have many workers",
    r"GPU available but not used",
    # tarkit's predict steps write their outputs themselves and return nothing on purpose.
    r"predict returned None",
)

# Loggers whose INFO lines are banners and tips ("GPU available: False", "Seed set to 0", "💡 Tip: ...").
CHATTY_LOGGERS = ("lightning.pytorch", "lightning.fabric", "lightning_fabric", "pytorch_lightning")


def quiet_libraries() -> None:
    """Hide known-harmless warnings and weight-loading progress bars (cheap: imports nothing)."""
    for message in HARMLESS_WARNINGS:
        warnings.filterwarnings("ignore", message=message)
    # transformers 5 and huggingface_hub draw a progress bar for every folder they load. Both read these at
    # import, so setting them costs nothing and reaches LightningCLI's child processes too; a user's own
    # setting wins.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    # Lightning 2.6 still calls jsonargparse APIs that jsonargparse 4.49+ deprecates.
    os.environ.setdefault("JSONARGPARSE_DEPRECATION_WARNINGS", "off")


def quiet_lightning() -> None:
    """Hide Lightning's banners and tips; call it after importing Lightning, whose import sets its loggers to
    INFO."""
    for name in CHATTY_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
