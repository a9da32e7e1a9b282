"""``UnifiedLMModule``: Tar's LM training, plain next-token prediction over text and image words."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

from tarkit.interfaces import LanguageModel
from tarkit.prompts import IGNORE_INDEX, pad_examples
from tarkit.registry import registry
from tarkit.tatok import TATok
from tarkit.training import TarkitModule
from tarkit.vocab import ImageVocabulary
from tarkit_plugins.lm.prediction import TaskPredictor
from tarkit_plugins.lm.settings import GenerationDefaults, TarSettings, default_scale, tatok_record, write_settings
from tarkit_plugins.pipelines import ImageToTextPipeline, TextToImagePipeline

LOSS_WEIGHTINGS = ("token", "sample")
IMAGE_LOSSES = ("image_rows", "full_vocab")


class CodeCache:
    """TA-Tok codes memoised by image content and scale, optionally persisted as safetensors in a folder, so a
    dataset is tokenized once however many epochs and runs use it (the TA-Tok is frozen)."""

    def __init__(self, folder: str | None):
        self.folder = Path(folder) if folder else None
        self.codes: dict[str, torch.Tensor] = {}
        if self.folder and (self.folder / "codes.safetensors").is_file():
            self.codes = load_file(str(self.folder / "codes.safetensors"))
        self.dirty = False

    @staticmethod
    def key(image: torch.Tensor, scale: int) -> str:
        digest = hashlib.sha1(image.detach().to(torch.float32).cpu().numpy().tobytes()).hexdigest()
        return f"{digest}_s{scale}"

    def encode(self, tatok: TATok, images: torch.Tensor, scale: int) -> torch.Tensor:
        keys = [self.key(image, scale) for image in images]
        todo = [i for i, k in enumerate(keys) if k not in self.codes]
        if todo:
            fresh = tatok.tokenize(images[todo], scale).cpu()
            for i, codes in zip(todo, fresh, strict=True):
                self.codes[keys[i]] = codes
            self.dirty = True
        return torch.stack([self.codes[k] for k in keys]).to(images.device)

    def save(self) -> None:
        if self.folder and self.dirty:
            self.folder.mkdir(parents=True, exist_ok=True)
            save_file(self.codes, str(self.folder / "codes.safetensors"))
            self.dirty = False


def chunked_cross_entropy(
    hidden: torch.Tensor, head: Callable[[torch.Tensor], torch.Tensor], targets: torch.Tensor, chunk_size: int = 512
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token cross-entropy and argmax-correctness of ``head(hidden)`` without materialising all logits:
    chunks of rows, each recomputed in backward (activation checkpointing), so memory is O(chunk x vocab)."""

    def chunk_loss(h: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = head(h).float()
        return F.cross_entropy(logits, t, reduction="none"), logits.argmax(-1) == t

    losses, correct = [], []
    for start in range(0, len(targets), chunk_size):
        h, t = hidden[start : start + chunk_size], targets[start : start + chunk_size]
        loss, hit = checkpoint(chunk_loss, h, t, use_reentrant=False) if torch.is_grad_enabled() else chunk_loss(h, t)
        losses.append(loss)
        correct.append(hit)
    if not losses:
        raise ValueError("batch has no supervised tokens; check the task formatters and max_length")
    return torch.cat(losses), torch.cat(correct)


def image_aware_cross_entropy(
    hidden: torch.Tensor, head: nn.Linear, targets: torch.Tensor, vocab: ImageVocabulary
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token cross-entropy (in the targets' order) where image-token targets are scored over the image rows
    of the head only, the distribution constrained decoding samples from inside an image span; every other
    target over the whole vocabulary. An image of 729 tokens then costs 65,536 logits per token, not ~217k
    (and 1,024 instead of ~152k in the miniature, where the full head would dominate a T2I step)."""
    is_image = vocab.is_image(targets)
    losses = torch.empty(len(targets), device=hidden.device)
    correct = torch.empty(len(targets), dtype=torch.bool, device=hidden.device)
    if is_image.any():
        rows = slice(vocab.image_start, vocab.image_end)
        bias = None if head.bias is None else head.bias[rows]

        def image_head(h: torch.Tensor) -> torch.Tensor:
            return F.linear(h, head.weight[rows], bias)

        losses[is_image], correct[is_image] = chunked_cross_entropy(
            hidden[is_image], image_head, targets[is_image] - vocab.image_start
        )
    if (~is_image).any():
        losses[~is_image], correct[~is_image] = chunked_cross_entropy(hidden[~is_image], head, targets[~is_image])
    return losses, correct


def reduce_token_losses(token_loss: torch.Tensor, rows: torch.Tensor, weighting: str) -> torch.Tensor:
    """The batch loss from per-token losses and each token's sample (row) index: the mean over tokens
    (``token``) or the mean over samples of each sample's mean (``sample``)."""
    if weighting == "token":
        return token_loss.mean()
    _, rows = rows.unique(return_inverse=True)  # only samples with supervised tokens count
    counts = torch.bincount(rows).to(token_loss.dtype)
    sums = torch.zeros_like(counts).index_add(0, rows, token_loss)
    return (sums / counts).mean()


class UnifiedLMModule(TarkitModule):
    """Trains a causal LM on mixed tasks over TA-Tok codes (group ``tarkit.modules``).

    The TA-Tok is frozen; every batch draws one pool scale from ``train_scales`` (paper ``[1, 1, 2, 3]``), its
    images are tokenized (cached with ``code_cache_dir``), each sample is formatted by its task's formatter
    (``tarkit.tasks``) and the loss is next-token cross-entropy on the assistant turns. Per-task loss and
    token accuracy are logged. At the end of fit the LM is saved as a Hugging Face folder that records its
    training scales, its TA-Tok and generation defaults in ``generation_config.json``
    (:mod:`tarkit_plugins.lm.settings`).

    Args:
        lm: the language model (``tarkit.lms``); its vocabulary is expanded with the TA-Tok's codes and scales
            unless it already has them.
        tatok: a TA-Tok folder (``TATok.save_pretrained``).
        train_scales: pool scales drawn per batch.
        init_from_codebook: initialise image-token input rows from the TA-Tok codebook when widths match.
        max_length: longest training sequence (tokens).
        image_loss: ``image_rows`` scores image-token targets over the image rows only (what constrained
            decoding samples from; far cheaper), ``full_vocab`` over the whole vocabulary (the reference's loss).
        loss_weighting: ``token`` averages the loss over all supervised tokens of the batch (the reference's);
            ``sample`` over each sample's tokens first, then over samples, so a two-token yes/no answer weighs as
            much as a 729-token image (without it, short answers get ~2 % of the gradient in a mixed batch).
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay.
        warmup_steps: linear warm-up steps, then cosine decay.
        code_cache_dir: folder to persist TA-Tok codes of seen images (None: in memory only).
        export_dir: where the trained LM (+ tokenizer) is saved at the end of fit, recording ``train_scales``,
            ``tatok`` and, as generation defaults, the most frequent training scale and ``cfg_scale``.
        predict_dir: where ``predict`` writes: ``answers.jsonl`` for questions, GenEval's folder layout for
            prompts (PNGs drawn by ``detokenizer``; each prompt's TA-Tok codes also in ``<00000>/codes.json``).
        predict_scale: pool scale of the images ``predict`` reads and generates; None: the scale the LM folder
            records (1 without a record).
        cfg_scale: classifier-free guidance for generated images (1: unguided, the reference's default); the
            exported folder records it as its default.
        detokenizer: a de-tokenizer folder trained on this TA-Tok; without one, ``predict`` writes codes only.
        detok_cfg_scale: the de-tokenizer's guidance when drawing predicted images.
        images_per_prompt: images generated per GenEval prompt (GenEval samples 4).
        seed: seeds the per-batch scale draw and generation.
    """

    def __init__(
        self,
        lm: LanguageModel,
        tatok: str,
        train_scales: list[int] | None = None,
        init_from_codebook: bool = True,
        max_length: int = 512,
        image_loss: str = "image_rows",
        loss_weighting: str = "token",
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        warmup_steps: int = 50,
        code_cache_dir: str | None = None,
        export_dir: str | None = None,
        predict_dir: str = "outputs/lm_predict",
        predict_scale: int | None = None,
        cfg_scale: float = 1.0,
        detokenizer: str | None = None,
        detok_cfg_scale: float = 1.0,
        images_per_prompt: int = 1,
        seed: int = 0,
    ):
        super().__init__()
        if image_loss not in IMAGE_LOSSES:
            raise ValueError(f"image_loss must be one of {', '.join(IMAGE_LOSSES)}, got {image_loss!r}")
        if loss_weighting not in LOSS_WEIGHTINGS:
            raise ValueError(f"loss_weighting must be one of {', '.join(LOSS_WEIGHTINGS)}, got {loss_weighting!r}")
        self.save_hyperparameters(ignore=["lm"])
        self.tatok = self.load_frozen_tatok(tatok)
        self.lm = lm
        codebook = self.tatok.codebook.codebook().detach() if init_from_codebook else None
        self.vocab = lm.ensure_image_vocabulary(self.tatok.num_codes, len(self.tatok.pool_scales), codebook)
        self.setup_scale_draw([self.tatok.check_scale(s) for s in (train_scales or [1, 1, 2, 3])], seed)
        self.formatters = {name: cls() for name, cls in registry.load_group("tarkit.tasks").items()}
        self.cache = CodeCache(code_cache_dir)

    def frozen_parts(self) -> list[nn.Module]:
        return [self.tatok]  # no dropout, deterministic codes

    def examples(self, batch: dict[str, Any], scale: int) -> list[dict[str, torch.Tensor]]:
        """Format every sample of a tarkit sample batch at ``scale``."""
        scale_index = self.tatok.pool_scales.index(scale)
        codes = {}
        for key in ("input_image", "target_image"):
            present = batch[f"has_{key}"]
            if present.any():
                codes[key] = dict(
                    zip(
                        present.nonzero().flatten().tolist(),
                        self.cache.encode(self.tatok, batch[key][present], scale),
                        strict=True,
                    )
                )
        out = []
        for i, task in enumerate(batch["task"]):
            if task not in self.formatters:
                raise ValueError(f"no task formatter for {task!r}; installed: {sorted(self.formatters)}")
            sample = {
                "task": task,
                "text": batch["text"][i],
                "answer": batch["answer"][i],
                "input_codes": codes.get("input_image", {}).get(i),
                "target_codes": codes.get("target_image", {}).get(i),
                "scale_index": scale_index,
            }
            out.append(self.formatters[task].format(sample, self.lm.tokenizer, self.vocab))
        return out

    def shared_step(self, batch: dict[str, Any], scale: int, stage: str) -> torch.Tensor:
        padded = pad_examples(self.examples(batch, scale), self.lm.tokenizer.pad_token_id, self.hparams.max_length)
        padded = {k: v.to(self.device) for k, v in padded.items()}
        hidden = self.lm.hidden_states(padded["input_ids"], padded["attention_mask"])
        labels = padded["labels"][:, 1:]
        supervised = labels != IGNORE_INDEX
        # Only supervised positions reach the output head: the expanded vocabulary has ~152k-217k rows.
        hidden, targets = hidden[:, :-1][supervised], labels[supervised]
        if self.hparams.image_loss == "image_rows":
            token_loss, correct = image_aware_cross_entropy(hidden, self.lm.output_head, targets, self.vocab)
        else:
            token_loss, correct = chunked_cross_entropy(hidden, self.lm.output_head, targets)
        token_rows = supervised.nonzero()[:, 0]
        loss = reduce_token_losses(token_loss, token_rows, self.hparams.loss_weighting)
        self.log(f"{stage}/loss", loss, prog_bar=True, batch_size=len(labels))
        row_task = [batch["task"][row] for row in token_rows.tolist()]
        for task in sorted(set(batch["task"])):
            mask = torch.tensor([t == task for t in row_task], device=self.device)
            rows = sum(t == task for t in batch["task"])
            if mask.any():
                self.log(f"{stage}/loss_{task}", token_loss[mask].mean(), batch_size=rows)
                self.log(f"{stage}/acc_{task}", correct[mask].float().mean(), batch_size=rows)
        return loss

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        return self.shared_step(batch, self.draw_scale(), "train")

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self.shared_step(batch, self.tatok.pool_scales[0], "val")

    def on_predict_epoch_start(self) -> None:
        hp = self.hparams
        self._predictor = TaskPredictor(
            ImageToTextPipeline(self.lm, self.tatok, hp.predict_scale),
            TextToImagePipeline(
                self.lm, self.tatok, hp.detokenizer, hp.predict_scale, hp.cfg_scale, detok_cfg_scale=hp.detok_cfg_scale
            ),
            self.formatters,
            hp.predict_dir,
            hp.images_per_prompt,
            torch.Generator().manual_seed(hp.seed),
        )

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        """Each row to its task (``kind``): answers for text-output tasks, images for image-output ones."""
        self._predictor.predict(batch)

    def on_predict_epoch_end(self) -> None:
        self._predictor.finish()

    def on_train_epoch_end(self) -> None:
        self.cache.save()

    def on_fit_end(self) -> None:
        self.cache.save()
        super().on_fit_end()

    def export(self, folder: str | Path) -> Path:
        """Save the LM (+ tokenizer) as a Hugging Face folder with this training's settings recorded in it."""
        out = self.lm.save_pretrained(folder)
        write_settings(out, self.settings(out))
        return out

    def settings(self, folder: str | Path) -> TarSettings:
        """What an LM folder at ``folder`` records about this training (see :mod:`tarkit_plugins.lm.settings`)."""
        hp = self.hparams
        return TarSettings(
            train_scales=self.train_scales,
            tatok=tatok_record(hp.tatok, folder, self.tatok.pool_scales, self.tatok.num_codes),
            generation=GenerationDefaults(scale=default_scale(self.train_scales), cfg_scale=hp.cfg_scale),
            lm_plugin=registry.name_of("tarkit.lms", type(self.lm)),
        )
