"""The core's interfaces: what each swappable part of Tar must provide.

Plugins subclass these (they are ``nn.Module`` + :class:`~tarkit.pretrained.PretrainedMixin`, so every part
saves and loads as a folder) and register the subclass under the matching entry-point group.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tarkit.pretrained import PretrainedMixin
from tarkit.prompts import Part, chat_example, image_span, user_prefix


class VisionEncoder(PretrainedMixin, nn.Module, ABC):
    """Pixels ``[B, 3, H, W]`` in ``[0, 1]`` -> features ``[B, N, C]`` on a square ``grid x grid`` layout.

    Group ``tarkit.encoders``. The encoder does its own resizing and normalisation.
    """

    @property
    @abstractmethod
    def grid_size(self) -> int:
        """Side of the square feature grid (27 for SigLIP2 so400m-patch14-384), so ``N = grid_size**2``."""

    @property
    @abstractmethod
    def width(self) -> int:
        """Feature width ``C``."""

    @property
    @abstractmethod
    def image_size(self) -> int:
        """Side of the square input the encoder works at (images are resized to it)."""

    @abstractmethod
    def forward(self, images: torch.Tensor) -> torch.Tensor: ...


class CodebookProjection(PretrainedMixin, nn.Module, ABC):
    """Produces the quantizer's codebook ``[K, D]``, e.g. frozen LLM token embeddings ``E`` times a learned ``W``.

    Group ``tarkit.codebooks``. Callers use :meth:`codebook`, which computes ``forward()`` once for inference and
    reuses it until a parameter or buffer changes (the projection of 65,536 codes is otherwise redone per batch).
    """

    def codebook(self) -> torch.Tensor:
        """The codebook; cached outside training and autograd, invalidated when any weight changes."""
        if self.training or torch.is_grad_enabled():
            return self.forward()
        # A tensor's _version counts its in-place updates (optimizer steps, load_state_dict, .copy_), so the
        # key changes whenever the weights do; identity, device and dtype catch replaced or moved tensors.
        key = tuple((id(t), t._version, t.device, t.dtype) for t in (*self.parameters(), *self.buffers()))
        cached = self.__dict__.get("_codebook_cache")
        if cached is None or cached[0] != key:
            cached = (key, self.forward().detach())
            self.__dict__["_codebook_cache"] = cached
        return cached[1]

    @property
    @abstractmethod
    def num_codes(self) -> int:
        """``K``, the number of codes (image tokens)."""

    @property
    @abstractmethod
    def dim(self) -> int:
        """``D``, the width of each code."""

    @abstractmethod
    def forward(self) -> torch.Tensor:
        """The codebook ``[K, D]``, differentiable with respect to the learned parameters."""


@dataclass
class QuantizerOutput:
    """What a :class:`Quantizer` returns: code indices, straight-through quantized vectors, loss and metrics."""

    indices: torch.Tensor  # [B, N] int64
    quantized: torch.Tensor  # [B, N, D], gradients flow to the input (straight-through)
    loss: torch.Tensor  # scalar: commitment + codebook terms
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)


class Quantizer(PretrainedMixin, nn.Module, ABC):
    """Features ``[B, N, D]`` -> nearest (or sampled) codes of a codebook ``[K, D]``. Group ``tarkit.quantizers``."""

    @abstractmethod
    def forward(self, features: torch.Tensor, codebook: torch.Tensor) -> QuantizerOutput: ...

    def lookup(self, indices: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
        """The vectors ``[..., D]`` that ``forward`` outputs for these code ``indices`` (override when the
        quantizer transforms codes, e.g. l2-normalises them). ``F.embedding``: its backward is deterministic on
        CPU, where indexing's is not."""
        return nn.functional.embedding(indices, codebook)


class TATokConverter(ABC):
    """Reads another implementation's TA-Tok file into a tarkit TA-Tok (group ``tarkit.tatok_converters``).

    :func:`tarkit.tatok.load_tatok` asks every installed converter whether it :meth:`accepts` a file and loads it
    with the one that does, so a third-party tokenizer brings its own format with no core edit.
    """

    @abstractmethod
    def accepts(self, path: Path) -> bool:
        """Whether this converter reads ``path`` (cheap: by name or a peek, never a full load)."""

    @abstractmethod
    def load(self, path: Path, load_teacher: bool = False, **options: Any) -> Any:
        """A :class:`tarkit.tatok.LoadedTATok`; ``options`` are the converter's own (documented there)."""


class DeTokenizer(PretrainedMixin, nn.Module, ABC):
    """TA-Tok decoded features ``[B, N, C]`` -> images ``[B, 3, H, W]`` in ``[0, 1]``: a generative model of
    pixels conditioned on the tokenizer's semantic features (TA-Tok codes are not pixel-exact).

    Group ``tarkit.detokenizers``. ``N`` follows the pool scale (729/169/81 in the paper), so a de-tokenizer
    accepts any square number of condition tokens. ``loss`` is its training objective; ``sample`` draws images
    with classifier-free guidance against a null condition, and ``cfg_scale=1`` must equal unguided sampling
    under the same generator.
    """

    @property
    @abstractmethod
    def condition_dim(self) -> int:
        """``C``, the width of the condition features (the TA-Tok's teacher width)."""

    @property
    @abstractmethod
    def image_size(self) -> int:
        """Side of the square images it produces (and expects in ``loss``)."""

    @abstractmethod
    def loss(self, condition: torch.Tensor, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Training objective for images ``[B, 3, H, W]`` in ``[0, 1]`` given their condition ``[B, N, C]``:
        a dict with the scalar ``"loss"`` to minimise plus any scalar metrics to log."""

    @abstractmethod
    def sample(
        self,
        condition: torch.Tensor,
        cfg_scale: float = 1.0,
        generator: torch.Generator | None = None,
        **sampling: Any,
    ) -> torch.Tensor:
        """Images ``[B, 3, H, W]`` in ``[0, 1]`` from condition features ``[B, N, C]``."""


class IncrementalDecoder(ABC):
    """One batch of left-padded prompts decoded a token at a time over a cache: what constrained generation needs.

    Made by :meth:`LanguageModel.incremental_decoder` for a 2D ``attention_mask [R, T]`` (1 = real token).
    A row's positions count its real tokens only, so left padding does not change what a row decodes.
    """

    @abstractmethod
    def prefill(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Run the whole prompt ``[R, T]``; return the last position's final hidden state ``[R, H]``."""

    @abstractmethod
    def step(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Append one token per row (``[R]``); return its final hidden state ``[R, H]``."""


class LanguageModel(PretrainedMixin, nn.Module, ABC):
    """A causal language model and its tokenizer, whose vocabulary tarkit expands with image words.

    Group ``tarkit.lms``. Generation needs only :meth:`incremental_decoder` and :attr:`output_head`: logits are
    ``output_head(hidden)``, so image sampling can multiply by the head's image rows alone. ``model`` is the
    underlying network (for a Hugging Face LM, its ``PreTrainedModel``).
    """

    model: nn.Module

    @property
    @abstractmethod
    def tokenizer(self) -> Any:
        """A Hugging Face tokenizer matching the model's vocabulary."""

    @property
    @abstractmethod
    def vocab(self) -> Any:
        """The :class:`tarkit.vocab.ImageVocabulary`; a clear error if the LM has no image words."""

    @abstractmethod
    def ensure_image_vocabulary(self, num_codes: int, num_scales: int = 3, codebook: torch.Tensor | None = None) -> Any:
        """Expand the vocabulary with image and scale words (or check it has exactly these); returns ``vocab``."""

    @abstractmethod
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Next-token logits ``[B, T, V]``."""

    @abstractmethod
    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Final hidden states ``[B, T, H]``; ``output_head`` maps them to logits."""

    @property
    @abstractmethod
    def output_head(self) -> nn.Module:
        """The output projection, an ``nn.Linear`` (``weight [V, H]``, optional bias): logits are exactly
        ``output_head(hidden)``, with no scaling or soft-capping after it."""

    @abstractmethod
    def incremental_decoder(self, attention_mask: torch.Tensor) -> IncrementalDecoder:
        """A cached decoder for prompts with this ``attention_mask [R, T]``; the caller holds the model in eval."""


SAMPLE_FIELDS = ("text", "answer", "input_image", "target_image")


class TaskFormatter(ABC):
    """One LM task: how a sample (texts plus the TA-Tok codes of its images) becomes a chat turn pair.

    Group ``tarkit.tasks``: the registered formatters are the set of tasks (built in: i2t, t2i, i2i, ti2i), so a
    plugin adds a task with no core edit. ``needs`` names the sample fields (of :data:`SAMPLE_FIELDS`) a sample
    of the task must have, which :func:`tarkit.data.make_sample` checks; ``default_ratio`` is the task's share in
    the default task mix (0: only when a recipe's ``task_ratios`` asks for it). ``output`` says what the
    assistant turn is, and so what prediction generates after :meth:`prompt`: ``"text"`` (the sample's
    ``answer``) or ``"image"`` (``<im_start><S{k}>`` + the target's image tokens + ``<im_end>``).

    A task defines :meth:`user`; training (:meth:`format`) and prediction (:meth:`prompt`) both build on it.
    ``sample`` has ``text``, ``answer``, ``input_codes`` and ``target_codes`` (``[n]`` code indices or None) and
    ``scale_index`` (the ``k`` of ``<S{k}>``); ``vocab`` is the :class:`tarkit.vocab.ImageVocabulary` of the
    expanded tokenizer.
    """

    name: str
    needs: frozenset[str] = frozenset()
    default_ratio: float = 0.0
    output: str = "text"

    @abstractmethod
    def user(self, sample: dict[str, Any], vocab: Any) -> list[Part]:
        """The user turn: text and token ids (an input image as :func:`tarkit.prompts.image_ids`)."""

    def assistant(self, sample: dict[str, Any], vocab: Any) -> list[Part]:
        """The supervised assistant turn: the answer, or the target image's span (see ``output``)."""
        if self.output == "image":
            return [image_span(vocab, self.codes(sample, "target_codes"), sample["scale_index"])]
        return [sample["answer"]]

    def format(self, sample: dict[str, Any], tokenizer: Any, vocab: Any) -> dict[str, torch.Tensor]:
        """``{"input_ids": [T], "labels": [T]}`` with labels ``-100`` outside the supervised assistant turn."""
        return chat_example(tokenizer, self.user(sample, vocab), self.assistant(sample, vocab))

    def prompt(self, sample: dict[str, Any], tokenizer: Any, vocab: Any) -> list[int]:
        """The generation prompt: the conversation up to where the assistant's turn begins."""
        return user_prefix(tokenizer, self.user(sample, vocab))

    def codes(self, sample: dict[str, Any], key: str) -> torch.Tensor:
        """``sample[key]`` (``input_codes`` / ``target_codes``); a clear error if the sample has none."""
        codes = sample.get(key)
        if codes is None:
            raise ValueError(f"{self.name} sample has no {key}")
        return codes
