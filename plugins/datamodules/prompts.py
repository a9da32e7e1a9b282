"""``prompts`` datamodule: inputs for ``tarkit predict`` — GenEval prompt files (T2I), POPE-style question files
(I2T), read in their own formats, edit files (``{"image", "instruction", "id"?}``: ti2i), rows of any task
(``{"task", "text", "id"?, "image"?}``), and folders of images (reconstruction)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Dataset

from tarkit.data import DataFormatError
from tarkit.images import image_to_tensor, load_image
from tarkit_plugins.evaluation import read_geneval_prompts
from tarkit_plugins.jsonl import read_jsonl

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


class PromptDataset(Dataset):
    """Rows of a GenEval prompt file (``kind`` t2i), a POPE question file (``kind`` i2t), an edit file (``kind``
    ti2i, the instruction as ``text``), a task file (``kind`` each row's ``task``) or the images of a folder
    (``kind`` image, ``id`` the file's stem). ``has_image`` says
    whether ``image`` is a real image (else zeros)."""

    def __init__(self, path: str, image_size: int, image_root: str | None = None):
        self.image_size = image_size
        if Path(path).is_dir():
            self.kind, self.root = "image", Path(path)
            self.rows = [{"image": p.name} for p in sorted(Path(path).iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES]
            if not self.rows:
                raise DataFormatError(f"{path}: no images ({', '.join(IMAGE_SUFFIXES)}) in this folder")
            return
        rows = read_jsonl(path)
        if not rows:
            raise DataFormatError(f"{path}: no rows")
        kinds = {"task": "task", "instruction": "edit", "tag": "t2i"}  # the field that tells each file kind apart
        self.kind = next((kind for field, kind in kinds.items() if field in rows[0]), "i2t")
        if self.kind == "task":
            self.rows = read_jsonl(path, required=("task", "text"))
        elif self.kind == "edit":
            self.rows = read_jsonl(path, required=("image", "instruction"))
        elif self.kind == "t2i":
            self.rows = read_geneval_prompts(path)
        else:
            self.rows = read_jsonl(path, required=("question_id", "image", "text"))
        self.root = Path(image_root) if image_root else Path(path).parent

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, Any]:
        row = self.rows[index]
        if self.kind == "t2i":
            return self._item("t2i", str(index), row["prompt"], None, row)
        if self.kind == "task":
            return self._item(row["task"], str(row.get("id", index)), row["text"], row.get("image"), row)
        if self.kind == "edit":
            return self._item("ti2i", str(row.get("id", index)), row["instruction"], row["image"], row)
        if self.kind == "image":
            return self._item("image", Path(row["image"]).stem, "", row["image"], {})
        return self._item("i2t", str(row["question_id"]), row["text"], row["image"], {})

    def _item(self, kind: str, row_id: str, text: str, image: str | None, record: dict[str, Any]) -> dict[str, Any]:
        if image is None:
            pixels = torch.zeros(3, self.image_size, self.image_size)
        else:
            what = str(self.root) if self.kind == "image" else f"{kind} row {row_id!r}"
            try:
                pixels = image_to_tensor(load_image(self.root / image), self.image_size)
            except (OSError, ValueError) as err:
                detail = " ".join(str(err).split())
                raise DataFormatError(f"{what}: cannot read image {image}: {detail}; replace or remove it") from err
        return {
            "kind": kind,
            "id": row_id,
            "text": text,
            "image": pixels,
            "has_image": image is not None,
            "record": json.dumps(record),
        }


class PromptsDataModule(LightningDataModule):
    """Prediction inputs: a GenEval ``evaluation_metadata.jsonl``-style file, POPE-style questions, rows of any
    registered task, or a folder of images (to reconstruct through a de-tokenizer).

    Args:
        path: the JSONL file (GenEval rows have ``tag``/``include``/``prompt``; questions have
            ``question_id``/``image``/``text``; task rows have ``task``/``text`` and optionally ``id`` and
            ``image``), or a folder of images.
        image_root: folder the rows' images are relative to (default: the file's folder).
        image_size: side images are resized to.
        batch_size: prompts per batch.
    """

    def __init__(self, path: str, image_root: str | None = None, image_size: int = 64, batch_size: int = 8):
        super().__init__()
        self.dataset = PromptDataset(path, image_size, image_root)
        self.batch_size = batch_size

    def predict_dataloader(self) -> DataLoader:
        return DataLoader(self.dataset, batch_size=self.batch_size, shuffle=False)
