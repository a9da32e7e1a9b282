"""Reading checkpoint files safely: ``torch.load(weights_only=True)`` only (tensors and plain containers, never
code); a file that would need more is refused in one line, as is a damaged one."""

from __future__ import annotations

import pickle
import re
from pathlib import Path
from typing import Any

import torch

from tarkit.paths import resolve_path
from tarkit.pretrained import PretrainedLoadError


def load_checkpoint(path: str | Path, mmap: bool = False) -> Any:
    """A ``torch.save`` file read with ``weights_only=True``; ``mmap`` maps tensors instead of reading them (a
    cheap check of a large file). A pickled object beyond tensors (which could run code) or a damaged file is
    a :class:`PretrainedLoadError` naming it."""
    path = resolve_path(str(path))
    if not path.is_file():
        raise PretrainedLoadError(f"{path}: no such checkpoint file")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as err:
        found = re.search(r"GLOBAL (\S+)", str(err)) if isinstance(err, pickle.UnpicklingError) else None
        if found:  # the weights-only unpickler met a class or function: loading it fully could run its code
            raise PretrainedLoadError(
                f"{path} holds a pickled Python object ({found[1]}), not only tensors: refused, since unpickling "
                "it could run code; re-save its tensors (a state_dict, or safetensors) from a copy you trust"
            ) from err
        detail = " ".join(str(err).split())[:160]
        raise PretrainedLoadError(
            f"{path} cannot be read as a weights-only torch checkpoint: damaged, truncated or another format "
            f"({type(err).__name__}: {detail}); download or save it again"
        ) from err
