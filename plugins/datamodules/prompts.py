"""``prompts`` datamodule: benchmark inputs for ``tarkit predict`` — GenEval prompt files (T2I) and POPE-style
question files (I2T), read in their own formats."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Dataset

from tarkit.data import DataFormatError, image_to_tensor, load_image, read_jsonl
from tarkit.evaluation import read_geneval_prompts


class PromptDataset(Dataset):
    """Rows of a GenEval prompt file (``kind`` t2i) or a POPE question file (``kind`` i2t)."""

    def __init__(self, path: str, image_size: int, image_root: str | None = None):
        rows = read_jsonl(path)
        if not rows:
            raise DataFormatError(f"{path}: no rows")
        self.kind = "t2i" if "tag" in rows[0] else "i2t"
        if self.kind == "t2i":
            self.rows = read_geneval_prompts(path)
        else:
            self.rows = read_jsonl(path, required=("question_id", "image", "text"))
        self.root = Path(image_root) if image_root else Path(path).parent
        self.image_size = image_size

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, Any]:
        row = self.rows[index]
        if self.kind == "t2i":
            image = torch.zeros(3, self.image_size, self.image_size)
            return {"kind": "t2i", "id": str(index), "text": row["prompt"], "image": image, "record": json.dumps(row)}
        try:
            image = image_to_tensor(load_image(self.root / row["image"]), self.image_size)
        except (OSError, ValueError) as err:
            raise DataFormatError(f"question {row['question_id']!r}: cannot read image {row['image']}: {err}") from err
        return {"kind": "i2t", "id": str(row["question_id"]), "text": row["text"], "image": image, "record": "{}"}


class PromptsDataModule(LightningDataModule):
    """Prediction inputs: a GenEval ``evaluation_metadata.jsonl``-style file or POPE-style questions.

    Args:
        path: the JSONL file (GenEval rows have ``tag``/``include``/``prompt``; questions have
            ``question_id``/``image``/``text``).
        image_root: folder question images are relative to (default: the file's folder).
        image_size: side images are resized to.
        batch_size: prompts per batch.
    """

    def __init__(self, path: str, image_root: str | None = None, image_size: int = 64, batch_size: int = 8):
        super().__init__()
        self.dataset = PromptDataset(path, image_size, image_root)
        self.batch_size = batch_size

    def predict_dataloader(self) -> DataLoader:
        return DataLoader(self.dataset, batch_size=self.batch_size, shuffle=False)
