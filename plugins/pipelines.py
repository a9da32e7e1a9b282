"""Inference pipelines with the reference's shapes: ``ImageToTextPipeline.generate(image, prompt)`` and
``TextToImagePipeline.generate_image(prompt)``, and ``EditPipeline.edit(image, instruction)`` for editing, built
from any registered LM and a TA-Tok.

Both take the parts directly or load them from folders: a Tar LM folder (a Hugging Face causal LM whose
tokenizer has the image words), a TA-Tok folder or reference ``ta_tok.pth``, and for T2I a de-tokenizer folder.
``from_pretrained(bundle)`` loads all of them from one folder holding ``lm/``, ``tatok/`` and a de-tokenizer
(what ``tarkit demo`` writes to ``outputs/demo/checkpoints``).

Defaults come from the LM folder's record (:mod:`tarkit_plugins.lm.settings`): ``scale=None`` is the scale it
was trained on (1 without a record), T2I's ``cfg_scale``/``temperature``/``top_k``/``top_p`` likewise, and
``tatok`` may be left out when the folder names a TA-Tok that exists. A scale the LM never saw in training is
allowed, with an :class:`UnseenScaleWarning`.

Images may be paths, PIL images, numpy arrays, tensors or lists of these
(:func:`tarkit_plugins.image_inputs.images_to_batch`).
Prompts are strings. An empty question to :class:`ImageToTextPipeline` asks for a caption ("Describe the image.", the
question the datamodules give caption records); an empty prompt to :class:`TextToImagePipeline` is the unconditional
prompt classifier-free guidance contrasts with, so it draws an unconditional sample. A prompt too long for the
LM's context (its ``context_length``, a Hugging Face config's ``max_position_embeddings``) together with what is
generated after it is refused with a one-line ``ValueError``, never truncated: a cut prompt asks something else.
"""

from __future__ import annotations

import json
import os
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Self

import torch
from PIL import Image

from tarkit import tatok as tatoks
from tarkit.interfaces import DeTokenizer, LanguageModel
from tarkit.paths import resolve_path
from tarkit.pretrained import config_class
from tarkit.prompts import Part, image_ids, user_prefix
from tarkit.registry import registry
from tarkit.tatok import TATok
from tarkit.vocab import ImageVocabulary
from tarkit_plugins.detok.autoencoder import MMAutoEncoder
from tarkit_plugins.image_inputs import ImageInput, images_to_batch
from tarkit_plugins.lm.generation import generate_image_codes, generate_text
from tarkit_plugins.lm.reflect import DEFAULT_QUESTION, best_of, image_log_likelihood, prompt_log_likelihood
from tarkit_plugins.lm.settings import TarSettings, read_settings, settings_of

Images = ImageInput | Sequence[ImageInput]
PathLike = str | os.PathLike


class UnseenScaleWarning(UserWarning):
    """The pipeline runs at a pool scale the LM was not trained on (allowed; expect worse results)."""


def _caller_level() -> int:
    """The ``stacklevel`` of the first caller outside this module, so a warning points at the user's line."""
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_globals.get("__name__") == __name__:
        frame, level = frame.f_back, level + 1
    return level


def load_lm(path: PathLike, lm: str | None = None) -> LanguageModel:
    """A Tar LM folder through the registered LM plugin ``lm``: by default the one the folder records
    (``lm_plugin``), else the only one installed."""
    name = lm or read_settings(path).lm_plugin
    if name is None:
        installed = sorted(registry.load_group("tarkit.lms"))
        if len(installed) != 1:
            raise ValueError(
                f"{os.fspath(path)} does not record its LM plugin and {len(installed)} are installed "
                f"({', '.join(installed)}); pass lm=NAME"
            )
        name = installed[0]
    return registry.get("tarkit.lms", name).from_pretrained(os.fspath(path))


def load_tatok(path: PathLike) -> TATok:
    """A TA-Tok folder or the reference's ``ta_tok.pth``."""
    return tatoks.load_tatok(os.fspath(path)).tatok.eval()


def recorded_tatok(settings: TarSettings, lm_folder: Path | None) -> Path | None:
    """The TA-Tok an LM's record names, if it exists: relative to the LM folder first (it holds wherever the
    folders of the stages move together, and a ``root:`` or relative path given to training depends on where
    it ran), else the path as given to training."""
    if settings.tatok is None:
        return None
    candidates = [resolve_path(settings.tatok.path)]
    if lm_folder is not None and settings.tatok.path_from_lm is not None:
        candidates.insert(0, lm_folder / settings.tatok.path_from_lm)
    return next((path for path in candidates if path.exists()), None)


def _no_tatok_message(settings: TarSettings) -> str:
    recorded = "records no TA-Tok" if settings.tatok is None else f"records {settings.tatok.path}, which is gone"
    return f"no tatok given and the LM {recorded}; pass tatok=<the TA-Tok folder it was trained with>"


def is_detokenizer_folder(folder: Path) -> bool:
    """Whether ``folder`` is a saved de-tokenizer: its ``config.json`` names a :class:`DeTokenizer` class."""
    config_file = folder / "config.json"
    if not config_file.is_file():
        return False
    cls = config_class(json.loads(config_file.read_text()))  # None for a Hugging Face folder (the LM, a teacher)
    return isinstance(cls, type) and issubclass(cls, DeTokenizer)


def find_detokenizer(bundle: Path) -> Path:
    """The one de-tokenizer folder inside a bundle; a one-line error if there is none or several."""
    found = sorted(sub for sub in bundle.iterdir() if sub.is_dir() and is_detokenizer_folder(sub))
    if not found:
        raise FileNotFoundError(
            f"no de-tokenizer in {bundle} (a sub-folder whose config.json names a DeTokenizer); train one with "
            "recipes/tiny/ar_detok.yaml, or pass detokenizer=None to generate codes only"
        )
    if len(found) > 1:
        names = ", ".join(f"{sub.name}/" for sub in found)
        raise ValueError(f"{bundle} holds several de-tokenizers ({names}); choose one with detokenizer=<folder>")
    return found[0]


def bundle_parts(bundle: PathLike, detokenizer: bool, given: Sequence[str] = ()) -> dict[str, Path]:
    """The folders a pipeline loads from a bundle (``lm/``, ``tatok/``, a de-tokenizer), except those ``given``.

    Without ``tatok/`` the pipeline falls back on the TA-Tok the LM records.
    """
    folder = Path(bundle)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder; from_pretrained expects a bundle holding lm/ and tatok/")
    parts: dict[str, Path] = {}
    if "lm" not in given:
        if not (folder / "lm").is_dir():
            raise FileNotFoundError(
                f"no lm/ in {folder}; train it with recipes/tiny/lm.yaml (export_dir {folder / 'lm'})"
            )
        parts["lm"] = folder / "lm"
    if "tatok" not in given:
        if (folder / "tatok").is_dir():
            parts["tatok"] = folder / "tatok"
        elif "lm" in parts and recorded_tatok(read_settings(parts["lm"]), parts["lm"]) is None:
            raise FileNotFoundError(
                f"no tatok/ in {folder} (and lm/ records no TA-Tok that exists); train it with recipes/tiny/tatok.yaml"
            )
    if detokenizer and "detokenizer" not in given:
        parts["detokenizer"] = find_detokenizer(folder)
    return parts


def left_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts of different lengths as one left-padded batch (generation continues every row at the end)."""
    length = max(len(r) for r in rows)
    ids = torch.full((len(rows), length), pad_id)
    mask = torch.zeros(len(rows), length, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, length - len(row) :] = torch.tensor(row)
        mask[i, length - len(row) :] = 1
    return ids, mask


def check_prompt(prompt: Any, what: str = "prompt") -> str:
    """``prompt`` itself, or a one-line ``TypeError`` when it is not a string."""
    if not isinstance(prompt, str):
        raise TypeError(f"{what} must be a string, got {type(prompt).__name__}")
    return prompt


def check_prompts(prompts: Any) -> list[str]:
    """A non-empty list (or tuple) of strings, or a one-line error."""
    if isinstance(prompts, str):
        raise TypeError("prompts must be a list of strings, got one string; wrap it in a list")
    if not isinstance(prompts, (list, tuple)):
        raise TypeError(f"prompts must be a list of strings, got {type(prompts).__name__}")
    if not prompts:
        raise ValueError("prompts is empty; pass at least one prompt")
    return [check_prompt(p, f"prompts[{i}]") for i, p in enumerate(prompts)]


class _TarPipeline:
    def __init__(self, lm: LanguageModel | PathLike, tatok: TATok | PathLike | None = None, scale: int | None = None):
        lm_folder = Path(lm) if isinstance(lm, (str, os.PathLike)) else None
        self.lm = load_lm(lm_folder) if lm_folder is not None else lm
        self.settings = read_settings(lm_folder) if lm_folder is not None else settings_of(self.lm.model)
        if tatok is None:
            tatok = recorded_tatok(self.settings, lm_folder)
            if tatok is None:
                raise ValueError(_no_tatok_message(self.settings))
        self.tatok = (load_tatok(tatok) if isinstance(tatok, (str, os.PathLike)) else tatok).eval()
        self.vocab: ImageVocabulary = self.lm.vocab  # a clear error if the LM lacks image tokens
        self._check_tatok()
        self.scale = self._choose_scale(scale)
        self.lm.eval()

    @classmethod
    def _from_bundle(cls, bundle: PathLike, detokenizer: bool, overrides: dict[str, Any]) -> Self:
        return cls(**bundle_parts(bundle, detokenizer, given=list(overrides)), **overrides)

    def _check_tatok(self) -> None:
        if self.vocab.num_codes != self.tatok.num_codes:
            raise ValueError(
                f"the LM has {self.vocab.num_codes} image tokens but the TA-Tok has {self.tatok.num_codes} codes; "
                "use the TA-Tok the LM was trained with"
            )
        record = self.settings.tatok
        # <S{k}> means the k-th pool scale: another list of scales would silently change what each token means.
        if record is not None and record.pool_scales is not None and record.pool_scales != self.tatok.pool_scales:
            raise ValueError(
                f"the LM was trained with a TA-Tok of pool scales {record.pool_scales} ({record.path}) but this one "
                f"has {self.tatok.pool_scales}; use the TA-Tok the LM was trained with"
            )

    def _choose_scale(self, scale: int | None) -> int:
        scale = self.tatok.check_scale(self.settings.generation.scale if scale is None else scale)
        trained = self.settings.train_scales
        if trained and scale not in trained:
            warnings.warn(
                f"scale {scale} was never used in training this LM (train_scales {trained}); expect worse results",
                UnseenScaleWarning,
                stacklevel=_caller_level(),
            )
        return scale

    @property
    def tokenizer(self) -> Any:
        return self.lm.tokenizer

    def check_context(self, prompts: list[list[int]], generated: int, what: str, fix: str) -> None:
        """A one-line ``ValueError`` if the longest prompt plus ``generated`` tokens exceeds the LM's context
        (an LM without ``context_length`` is not checked)."""
        limit, longest = getattr(self.lm, "context_length", None), max(len(p) for p in prompts)
        if limit is not None and longest + generated > limit:
            raise ValueError(
                f"the prompt is {longest} tokens and {what} {generated} more, beyond the LM's context of {limit} "
                f"tokens (max_position_embeddings); shorten the prompt{fix}"
            )

    def one_image(self, image: ImageInput, call: str, batched: str) -> torch.Tensor:
        """The input batch of a one-image call; several images are a one-line error pointing at ``batched``."""
        pixels = self.pixels(image)
        if len(pixels) != 1:
            raise ValueError(f"{call} takes one image, got {len(pixels)}; use {batched} for several")
        return pixels

    def pixels(self, images: Images) -> torch.Tensor:
        """Any accepted image input as the TA-Tok's input batch (on its device)."""
        device = next(self.tatok.parameters()).device
        return images_to_batch(images, self.tatok.encoder.image_size).to(device)


class ImageToTextPipeline(_TarPipeline):
    """Understanding: image + question -> answer text.

    Args:
        lm: a Tar LM (or its folder).
        tatok: the TA-Tok it was trained with (or its folder); optional when the LM folder records one.
        scale: pool scale images are read at; ``None`` is the LM folder's recorded scale (1 without a record).

    An empty (or blank) question means "Describe the image.", the question captions are trained with.
    """

    @classmethod
    def from_pretrained(cls, bundle: PathLike, **overrides: Any) -> ImageToTextPipeline:
        """Load from a bundle folder holding ``lm/`` and ``tatok/``; keyword arguments override (e.g. ``scale``)."""
        return cls._from_bundle(bundle, detokenizer=False, overrides=overrides)

    @torch.no_grad()
    def generate_batch(
        self,
        images: Images,
        prompts: list[str],
        max_new_tokens: int = 64,
        temperature: float = 0.0,
        generator: torch.Generator | None = None,
    ) -> list[str]:
        """One answer per (image, question) pair; ``temperature`` 0 is greedy."""
        questions = [p if p.strip() else DEFAULT_QUESTION for p in check_prompts(prompts)]
        pixels = self.pixels(images)
        if len(pixels) != len(questions):
            raise ValueError(f"got {len(pixels)} images but {len(questions)} prompts")
        codes = self.tatok.tokenize(pixels, self.scale).cpu()
        rows = [
            user_prefix(self.tokenizer, [image_ids(self.vocab, c), "\n" + q])
            for c, q in zip(codes, questions, strict=True)
        ]
        return self.answer_prompts(rows, max_new_tokens, temperature, generator)

    @torch.no_grad()
    def answer_prompts(
        self,
        prompts: list[list[int]],
        max_new_tokens: int = 64,
        temperature: float = 0.0,
        generator: torch.Generator | None = None,
    ) -> list[str]:
        """The text answer to each prompt given as token ids up to the assistant turn (e.g. a task's ``prompt``);
        image tokens are never emitted."""
        self.check_context(prompts, max_new_tokens, "max_new_tokens asks for", " or lower max_new_tokens")
        ids, mask = left_pad(prompts, self.tokenizer.pad_token_id)
        eos = [self.tokenizer.convert_tokens_to_ids("<|im_end|>"), self.tokenizer.eos_token_id]
        new = generate_text(
            self.lm,
            ids,
            mask,
            max_new_tokens,
            eos_token_ids=[e for e in eos if e is not None],
            banned_token_ids=(self.vocab.im_start, self.vocab.image_end),
            temperature=temperature,
            generator=generator,
        )
        return [self.tokenizer.decode(row, skip_special_tokens=True).strip() for row in new]

    def generate(self, image: ImageInput, prompt: str, **kwargs: Any) -> str:
        """The reference's call shape: one image and its question -> the answer."""
        pixels = self.one_image(image, "generate", "generate_batch")
        return self.generate_batch(pixels, [check_prompt(prompt)], **kwargs)[0]


class TextToImagePipeline(_TarPipeline):
    """Generation: prompt -> TA-Tok codes at the pipeline's scale -> the de-tokenizer's image.

    ``scale``, ``cfg_scale``, ``temperature``, ``top_k`` and ``top_p`` left ``None`` take the LM folder's
    recorded defaults, else the reference's (scale 1, cfg 1 = unguided, temperature 1.0, top-k 1200, top-p
    0.95); ``top_k=0`` and ``top_p=1`` turn those filters off. ``tatok`` is optional when the LM folder records
    one. ``detokenizer`` is any de-tokenizer (or its folder) trained on this TA-Tok; swapping one kind for
    another is a change of that argument only; without one, only codes can be generated. ``detok_cfg_scale``
    and ``detok_sampling`` go to the de-tokenizer's ``sample``. ``candidates > 1`` turns on self-reflection:
    that many codes are sampled per prompt and the one the LM reads back best is kept
    (:mod:`tarkit_plugins.lm.reflect`).
    An empty prompt is the unconditional prompt guidance contrasts with: it draws an unconditional sample.
    """

    def __init__(
        self,
        lm: LanguageModel | PathLike,
        tatok: TATok | PathLike | None = None,
        detokenizer: DeTokenizer | PathLike | None = None,
        scale: int | None = None,
        cfg_scale: float | None = None,
        temperature: float | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        detok_cfg_scale: float = 1.0,
        detok_sampling: dict[str, Any] | None = None,
        candidates: int = 1,
    ):
        super().__init__(lm, tatok, scale)
        if candidates < 1:
            raise ValueError(f"candidates must be >= 1, got {candidates}")
        self.candidates = candidates
        recorded = self.settings.generation
        self.cfg_scale = recorded.cfg_scale if cfg_scale is None else cfg_scale
        self.temperature = recorded.temperature if temperature is None else temperature
        self.top_k = recorded.top_k if top_k is None else (top_k or None)  # 0: off
        self.top_p = recorded.top_p if top_p is None else top_p
        if isinstance(detokenizer, os.PathLike):
            detokenizer = os.fspath(detokenizer)  # MMAutoEncoder loads str paths
        self.autoencoder = (
            None
            if detokenizer is None
            else MMAutoEncoder(self.tatok, detokenizer, self.scale, detok_cfg_scale, **(detok_sampling or {}))
        )

    @classmethod
    def from_pretrained(cls, bundle: PathLike, **overrides: Any) -> TextToImagePipeline:
        """Load from a bundle folder holding ``lm/``, ``tatok/`` and one de-tokenizer folder (any sub-folder whose
        ``config.json`` names a de-tokenizer); keyword arguments override (``detokenizer=None``: codes only)."""
        return cls._from_bundle(bundle, detokenizer=True, overrides=overrides)

    @torch.no_grad()
    def generate_codes(self, prompts: list[str], generator: torch.Generator | None = None) -> torch.Tensor:
        """Codes ``[B, n]`` for each prompt, exactly ``n`` per image at the pipeline's scale."""
        rows = [user_prefix(self.tokenizer, [p]) for p in check_prompts(prompts)]
        return self.codes_for_prompts(rows, [user_prefix(self.tokenizer, [""])], generator)  # one uncond row serves all

    @torch.no_grad()
    def codes_for_prompts(
        self, prompts: list[list[int]], uncond_prompts: list[list[int]], generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Codes ``[B, n]`` for prompts given as token ids up to the assistant turn (e.g. a task's ``prompt``);
        ``uncond_prompts`` (one row, or one per prompt) are what guidance contrasts with."""
        num_tokens = self.tatok.tokens_per_image(self.scale)
        self.check_context([*prompts, *uncond_prompts], 2 + num_tokens, "the image takes", " or use a larger scale")
        pad = self.tokenizer.pad_token_id
        ids, mask = left_pad(prompts, pad)
        uncond_ids, uncond_mask = left_pad(uncond_prompts, pad)
        return generate_image_codes(
            self.lm,
            self.vocab,
            ids,
            mask,
            num_tokens=num_tokens,
            scale_index=self.tatok.pool_scales.index(self.scale),
            cfg_scale=self.cfg_scale,
            uncond_input_ids=uncond_ids,
            uncond_attention_mask=uncond_mask,
            temperature=self.temperature,
            top_k=self.top_k,
            top_p=self.top_p,
            generator=generator,
        )

    def codes_from_token_ids(self, ids: Sequence[int] | torch.Tensor) -> torch.Tensor:
        """The codes ``[1, n]`` of the image in a token stream generated without constraints (e.g. by the LM's own
        ``generate``): ``<im_start><S{k}>``, exactly the ``n`` image tokens of scale ``k``, then ``<im_end>`` or
        the end. Anything else is a one-line ``ValueError`` naming the problem; :meth:`generate_codes` samples
        under constraints and never needs this."""
        ids, vocab = torch.as_tensor(ids).flatten().tolist(), self.vocab
        fix = "sample with generate_codes, which only emits image tokens inside the span"
        if vocab.im_start not in ids:
            raise ValueError(f"the token stream has no <im_start>, so it holds no image; {fix}")
        opening, scales = ids.index(vocab.im_start) + 1, len(self.tatok.pool_scales)
        if opening == len(ids) or ids[opening] not in vocab.scale_ids[:scales]:
            raise ValueError(f"<im_start> is not followed by a scale token <S0>..<S{scales - 1}>; {fix}")
        span = ids[opening + 1 :]
        span = span[: span.index(vocab.im_end)] if vocab.im_end in span else span
        scale = self.tatok.pool_scales[vocab.scale_of(ids[opening])]
        for position, token in enumerate(span):
            if not vocab.image_start <= token < vocab.image_end:
                raise ValueError(f"token {token} at position {position} of the image span is not an image token; {fix}")
        if len(span) != self.tatok.tokens_per_image(scale):
            raise ValueError(
                f"the image span holds {len(span)} image tokens but scale {scale} takes "
                f"{self.tatok.tokens_per_image(scale)}; {fix}"
            )
        return torch.tensor([span]) - vocab.image_start

    def reflect(self, prompts: list[str], generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """Self-reflection: ``candidates`` codes per prompt, each scored by the LM's prompt likelihood.

        Returns ``codes [B, n]`` (the best candidate per prompt), ``candidate_codes [B * candidates, n]`` (grouped
        by prompt) and their ``scores [B * candidates]``.
        """
        repeated = [p for p in check_prompts(prompts) for _ in range(self.candidates)]
        candidate_codes = self.generate_codes(repeated, generator)
        scores = prompt_log_likelihood(self.lm, self.vocab, candidate_codes, repeated)
        best = best_of(scores, self.candidates)
        return {"codes": candidate_codes[best], "candidate_codes": candidate_codes, "scores": scores}

    def _check_detokenizer(self) -> MMAutoEncoder:
        if self.autoencoder is None:
            raise ValueError(
                "TextToImagePipeline has no de-tokenizer; pass detokenizer=<folder or part> to draw images "
                "(generate_codes works without one)"
            )
        return self.autoencoder

    def decode(self, codes: torch.Tensor, generator: torch.Generator | None = None) -> list[Image.Image]:
        """TA-Tok codes ``[B, n]`` -> PIL images through the de-tokenizer."""
        pixels = self._check_detokenizer().decode_from_encoder_indices(codes, generator=generator)
        return [Image.fromarray(p.permute(1, 2, 0).cpu().numpy(), mode="RGB") for p in pixels]

    def generate_images(self, prompts: list[str], generator: torch.Generator | None = None) -> list[Image.Image]:
        """One image per prompt, generated as one batch (the self-reflected best when ``candidates > 1``)."""
        self._check_detokenizer()  # before sampling: codes are the slow part
        if self.candidates > 1:
            return self.decode(self.reflect(prompts, generator)["codes"], generator)
        return self.decode(self.generate_codes(prompts, generator), generator)

    def generate_image(self, prompt: str, generator: torch.Generator | None = None) -> Image.Image:
        """The reference's call shape: prompt -> image."""
        return self.generate_images([check_prompt(prompt)], generator)[0]


class EditPipeline(TextToImagePipeline):
    """Editing (the ``ti2i`` task): image + instruction -> the edited image.

    The user turn is the image's codes at the pipeline's scale, then "\\n" and the instruction, as the ``ti2i``
    task formats it in training; the edited image is sampled under the same constraints and settings as T2I
    (image tokens only, exactly the scale's count; ``scale``, ``cfg_scale``, ``temperature``, ``top_k``,
    ``top_p`` as there). Guidance contrasts with the same image without the instruction (the ``i2i`` prompt, a
    redraw), so ``cfg_scale > 1`` pushes the sample away from an unchanged copy toward what the instruction asks.
    An empty instruction redraws the image. With ``candidates > 1`` each edit samples that many and keeps the one
    the instruction explains best (self-reflection for edits): the largest gain in the LM's log-likelihood of the
    candidate's codes given the instruction over the likelihood without it
    (:func:`tarkit_plugins.lm.reflect.image_log_likelihood`). Needs an LM trained on ``ti2i``.
    """

    @classmethod
    def from_pretrained(cls, bundle: PathLike, **overrides: Any) -> EditPipeline:
        """Load from a bundle folder (as :meth:`TextToImagePipeline.from_pretrained`)."""
        return cls._from_bundle(bundle, detokenizer=True, overrides=overrides)

    def users(self, codes: torch.Tensor, instructions: list[str]) -> tuple[list[list[Part]], list[list[Part]]]:
        """The user turns with and without each instruction: what is sampled and what guidance contrasts with."""
        images = [image_ids(self.vocab, c) for c in codes]
        edits = [[image, "\n" + text] if text else [image] for image, text in zip(images, instructions, strict=True)]
        return edits, [[image] for image in images]

    @torch.no_grad()
    def edit_codes(
        self, images: Images, instructions: list[str], generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """The edited images' codes ``[B, n]`` at the pipeline's scale."""
        instructions = check_prompts(instructions)
        pixels = self.pixels(images)
        if len(pixels) != len(instructions):
            raise ValueError(f"got {len(pixels)} images but {len(instructions)} instructions")
        edits, redraws = self.users(self.tatok.tokenize(pixels, self.scale).cpu(), instructions)
        per = self.candidates
        edits, redraws = [u for u in edits for _ in range(per)], [u for u in redraws for _ in range(per)]
        tokenizer = self.tokenizer
        codes = self.codes_for_prompts(
            [user_prefix(tokenizer, u) for u in edits], [user_prefix(tokenizer, u) for u in redraws], generator
        )
        if per == 1:
            return codes
        scale_index = self.tatok.pool_scales.index(self.scale)
        gain = image_log_likelihood(self.lm, self.vocab, edits, codes, scale_index) - image_log_likelihood(
            self.lm, self.vocab, redraws, codes, scale_index
        )
        return codes[best_of(gain, per)]

    def edit_images(
        self, images: Images, instructions: list[str], generator: torch.Generator | None = None
    ) -> list[Image.Image]:
        """One edited image per (image, instruction) pair, as one batch."""
        self._check_detokenizer()  # before sampling: codes are the slow part
        return self.decode(self.edit_codes(images, instructions, generator), generator)

    def edit(self, image: ImageInput, instruction: str, generator: torch.Generator | None = None) -> Image.Image:
        """One image and its instruction -> the edited image."""
        pixels = self.one_image(image, "edit", "edit_images")
        return self.edit_images(pixels, [check_prompt(instruction, "instruction")], generator)[0]
