"""A semantic teacher for the miniature: pretrain a tiny SigLIP vision tower with SigLIP's sigmoid loss.

TA-Tok distils a text-aligned teacher (SigLIP2 in the paper). No pretrained SigLIP2 can be downloaded here,
so for ShapesWorld this module trains one on image-caption pairs, with a small text tower over hashed words,
and exports the vision tower as a Hugging Face folder that the ``siglip2`` encoder loads with
``pretrained: <folder>``. With real SigLIP2 weights this stage is skipped.
"""

from __future__ import annotations

import re
import zlib
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from tarkit.interfaces import VisionEncoder
from tarkit.training import TarkitModule


def hash_words(texts: list[str], buckets: int, max_words: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Lower-cased words -> stable hashed ids ``[B, T]`` (0 = padding) and a padding mask (True = word)."""
    ids = torch.zeros(len(texts), max_words, dtype=torch.long)
    for row, text in enumerate(texts):
        words = re.findall(r"[a-z]+", text.lower())[:max_words]
        for col, word in enumerate(words):
            ids[row, col] = 1 + zlib.crc32(word.encode()) % (buckets - 1)
    return ids, ids != 0


class _GatherRows(torch.autograd.Function):
    """``all_gather`` along rows whose backward sums the gradient over the processes and keeps this process's rows.
    Written out because gloo has no ``reduce_scatter`` and ``torch.distributed.nn``'s differentiable gather is
    deprecated; an ``all_reduce`` every backend has."""

    @staticmethod
    def forward(ctx: Any, rows: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(rows) for _ in range(torch.distributed.get_world_size())]
        torch.distributed.all_gather(parts, rows.contiguous())
        ctx.rows = len(rows)
        return torch.cat(parts)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()  # all_reduce works in place; autograd's tensor is not ours to change
        torch.distributed.all_reduce(grad)
        start = torch.distributed.get_rank() * ctx.rows
        return grad[start : start + ctx.rows]


def gather_captions(text: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Every process's caption embeddings ``[world * B, D]`` and where this process's rows start (rank * B).

    SigLIP's negatives are the whole global batch's captions: under data parallelism each process scores its images
    against all of them, so N processes at B/N images each optimise the loss one process at B does. The gather's
    backward sums each caption's gradient over the processes whose images met it, and DDP's gradient average then
    equals the single-process gradient. One process (or none initialised) keeps its own captions. Every process must
    bring the same B (DistributedSampler's equal shares do)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return text, 0
    return _GatherRows.apply(text), torch.distributed.get_rank() * len(text)


class HashedTextTower(nn.Module):
    """Word embeddings (hashed vocabulary, no tokenizer file) + positions + a small Transformer, mean-pooled."""

    def __init__(self, width: int, depth: int, heads: int, buckets: int, max_words: int):
        super().__init__()
        self.buckets, self.max_words = buckets, max_words
        self.words = nn.Embedding(buckets, width, padding_idx=0)
        self.positions = nn.Parameter(torch.randn(max_words, width) * 0.02)
        layer = nn.TransformerEncoderLayer(width, heads, 4 * width, dropout=0.0, batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)

    def forward(self, texts: list[str]) -> torch.Tensor:
        ids, present = hash_words(texts, self.buckets, self.max_words)
        ids, present = ids.to(self.positions.device), present.to(self.positions.device)
        hidden = self.blocks(self.words(ids) + self.positions, src_key_padding_mask=~present)
        weights = present.unsqueeze(-1).float()
        return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0)


class SigLIPTeacherModule(TarkitModule):
    """Contrastive image-text pretraining with the sigmoid loss of SigLIP (Zhai et al., 2023).

    Every pair ``(i, j)`` in a batch is a binary problem: ``-log sigmoid(z_ij * (t * <img_i, txt_j> + b))`` with
    ``z_ij = +1`` on the diagonal and ``-1`` elsewhere; ``t`` and ``b`` are learned (initialised to 10, -10).
    Captions are the sample's supervised text: the answer of i2t samples (descriptions), else the prompt.

    ``dense_weight`` adds a dense term: a linear head must redraw each patch's pixels from that patch's output
    token. A contrastive loss on mean-pooled features alone lets every token drift to the image's global
    embedding (measured on ShapesWorld: tokens within an image reach cosine 0.97 to their mean), and TA-Tok
    then quantizes all of an image's tokens to one code. SigLIP2 keeps its patch features local with dense
    objectives of its own (a captioning/referring decoder, self-distillation, masked prediction); this is the
    miniature's cheap stand-in for them.

    Args:
        encoder: the vision tower to pretrain (``siglip2``; its output features are mean-pooled).
        embed_dim: width of the shared image-text space.
        text_width: width of the text tower.
        text_depth: Transformer layers of the text tower.
        text_buckets: hashed word vocabulary size.
        max_words: words kept per caption.
        dense_weight: weight of the per-patch pixel term (0: the plain SigLIP objective).
        lr: AdamW learning rate (constant: the module has no warm-up, so no schedule).
        weight_decay: AdamW weight decay.
        export_dir: where to write the vision tower (a Hugging Face folder) at the end of fit.
    """

    def __init__(
        self,
        encoder: VisionEncoder,
        embed_dim: int = 64,
        text_width: int = 64,
        text_depth: int = 2,
        text_buckets: int = 4096,
        max_words: int = 24,
        dense_weight: float = 0.0,
        lr: float = 1e-3,
        weight_decay: float = 1e-4,
        export_dir: str | None = None,
    ):
        super().__init__()
        self.save_hyperparameters(ignore=["encoder"])
        self.encoder = encoder
        self.image_head = nn.Linear(encoder.width, embed_dim)
        self.text_tower = HashedTextTower(text_width, text_depth, 4, text_buckets, max_words)
        self.text_head = nn.Linear(text_width, embed_dim)
        self.logit_scale = nn.Parameter(torch.tensor(10.0).log())
        self.logit_bias = nn.Parameter(torch.tensor(-10.0))
        self.patch_size = encoder.image_size // encoder.grid_size
        self.patch_head = nn.Linear(encoder.width, 3 * self.patch_size**2) if dense_weight > 0 else None

    def embed(self, images: torch.Tensor, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Normalised image and text embeddings, and the image's patch tokens ``[B, N, C]``."""
        tokens = self.encoder(images)
        image = F.normalize(self.image_head(tokens.mean(1)), dim=-1)
        text = F.normalize(self.text_head(self.text_tower(texts)), dim=-1)
        return image, text, tokens

    def patch_pixels(self, images: torch.Tensor) -> torch.Tensor:
        """Each patch's pixels ``[B, N, 3 * p * p]`` at the encoder's resolution, in the token order."""
        size = self.encoder.image_size
        if images.shape[-1] != size or images.shape[-2] != size:
            images = F.interpolate(images, size=(size, size), mode="bicubic", align_corners=False)
        return F.unfold(images, kernel_size=self.patch_size, stride=self.patch_size).transpose(1, 2)

    @staticmethod
    def pairs(batch: dict[str, Any]) -> tuple[torch.Tensor, list[str]]:
        """Images and captions of a tarkit sample batch (any task mix)."""
        use_input = batch["has_input_image"].view(-1, 1, 1, 1)
        images = torch.where(use_input, batch["input_image"], batch["target_image"])
        texts = [a if t == "i2t" else q for t, q, a in zip(batch["task"], batch["text"], batch["answer"], strict=True)]
        return images, texts

    def siglip_loss(self, image: torch.Tensor, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The sigmoid loss and in-batch retrieval accuracy of this process's images against every caption of the
        global batch (see :func:`gather_captions`), normalised by this process's image count."""
        captions, offset = gather_captions(text)
        logits = image @ captions.T * self.logit_scale.exp() + self.logit_bias
        matches = torch.arange(len(image), device=image.device) + offset
        labels = -torch.ones_like(logits)
        labels[torch.arange(len(image), device=image.device), matches] = 1.0
        loss = -F.logsigmoid(labels * logits).sum() / len(image)
        accuracy = (logits.argmax(dim=1) == matches).float().mean()
        return loss, accuracy

    def _step(self, batch: dict[str, Any], stage: str) -> torch.Tensor:
        images, texts = self.pairs(batch)
        image, text, tokens = self.embed(images, texts)
        loss, accuracy = self.siglip_loss(image, text)
        if self.patch_head is not None:
            dense = F.mse_loss(self.patch_head(tokens), self.patch_pixels(images))
            self.log(f"{stage}/dense_loss", dense, batch_size=len(texts), sync_dist=True)
            loss = loss + self.hparams.dense_weight * dense
        # averaged over the processes (every one logs these three each step): the global batch's figures, which
        # is what one process at the global batch size logs
        self.log(f"{stage}/loss", loss, prog_bar=True, batch_size=len(texts), sync_dist=True)
        self.log(f"{stage}/retrieval_acc", accuracy, prog_bar=True, batch_size=len(texts), sync_dist=True)
        return loss

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._step(batch, "val")

    def export(self, folder: str | Path) -> Path:
        """Write the vision tower as a Hugging Face folder (``SiglipVisionModel.from_pretrained`` reads it, and so
        does the ``siglip2`` encoder's ``pretrained``)."""
        hf_model = getattr(self.encoder, "model", None)
        if not hasattr(hf_model, "save_pretrained"):
            raise TypeError(f"{type(self.encoder).__name__} has no Hugging Face model to export; use siglip2")
        hf_model.save_pretrained(folder)
        return Path(folder)
