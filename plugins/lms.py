"""Language models (group ``tarkit.lms``): any Hugging Face causal LM with its tokenizer and Tar's image words.

A Tar LM is saved exactly as the reference publishes Tar-1.5B: a Hugging Face causal LM folder whose tokenizer
holds the added image words, so ``Qwen2ForCausalLM.from_pretrained(folder)`` and
``AutoTokenizer.from_pretrained(folder)`` load it without tarkit.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, ClassVar, Self

import torch
from torch import nn
from transformers import CONFIG_MAPPING, AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel
from transformers.utils import logging as hf_logging

from tarkit.interfaces import LanguageModel
from tarkit.paths import resolve_path
from tarkit.pretrained import PretrainedLoadError, resolve_pretrained_dir
from tarkit.vocab import IM_START, ImageVocabulary
from tarkit_plugins.lm import lora as lora_lib
from tarkit_plugins.lm.cached_decoder import HFCachedDecoder
from tarkit_plugins.lm.lora import LoRA
from tarkit_plugins.lm.tokenizers import QWEN2, TOKENIZER_FILES, load_tokenizer
from tarkit_plugins.lm.vocab_expansion import check_vocabulary, expand_vocabulary
from tarkit_plugins.presets import preset_values

LM_PRESETS: dict[str, dict[str, Any]] = {
    # CPU miniature. The vocabulary (set from the tokenizer) dominates: tied embeddings keep one matrix of it.
    "tiny": {
        "hidden_size": 128,
        "intermediate_size": 384,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 4096,
        "tie_word_embeddings": True,
    },
    # Qwen/Qwen2.5-1.5B-Instruct, Tar-1.5B's base: 1.54B parameters (1.31B outside the embeddings).
    "qwen2.5-1.5b": {
        "hidden_size": 1536,
        "intermediate_size": 8960,
        "num_hidden_layers": 28,
        "num_attention_heads": 12,
        "num_key_value_heads": 2,
        "max_position_embeddings": 32768,
        "max_window_layers": 21,
        "rms_norm_eps": 1e-6,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1_000_000.0},
        "tie_word_embeddings": True,
        "vocab_size": 151936,
    },
}

# What a causal LM folder on the hub needs: config, weights, tokenizer files and chat template.
HF_FOLDER_FILES = ("*.json", "*.safetensors", "*.txt", "*.model", "*.tiktoken", "*.jinja")


def _hf_folder(pretrained: str) -> Path:
    try:
        folder = resolve_pretrained_dir(resolve_path(pretrained), HF_FOLDER_FILES)
    except (PretrainedLoadError, FileNotFoundError, ValueError) as err:
        raise PretrainedLoadError(f"HFCausalLM(pretrained={pretrained!r}): {err}") from err
    if not (folder / "config.json").is_file() and not lora_lib.is_adapter_folder(folder):
        raise PretrainedLoadError(f"{folder} has no config.json; is it a Hugging Face causal LM folder?")
    return folder


def _load_model(folder: Path, overrides: dict[str, Any]) -> PreTrainedModel:
    """A causal LM folder, or a LoRA adapter folder (``lora.save: adapter``'s) merged into the base it names."""
    if not lora_lib.is_adapter_folder(folder):
        return _load_causal_lm(folder, overrides)
    base = _load_causal_lm(_hf_folder(lora_lib.adapter_base(folder)), overrides)
    return lora_lib.merge_adapter_folder(base, folder)


# The reference trains Tar as LLaVA's "llava_qwen" (Qwen2 with the vision tower inside); transformers does not know
# that type, but the config is Qwen2's and so are the LM weights (the tower's, if saved too, are left out).
BASE_MODEL_TYPES = {"llava_qwen": "qwen2"}


def _read_config(folder: Path, overrides: dict[str, Any]) -> PretrainedConfig:
    model_type = json.loads((folder / "config.json").read_text()).get("model_type")
    if model_type not in BASE_MODEL_TYPES:
        return AutoConfig.from_pretrained(folder, **overrides)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the warning that the model type differs is the point here
    try:
        return CONFIG_MAPPING[BASE_MODEL_TYPES[model_type]].from_pretrained(folder, **overrides)
    finally:
        hf_logging.set_verbosity(verbosity)


def _load_causal_lm(folder: Path, overrides: dict[str, Any]) -> PreTrainedModel:
    try:
        config = _read_config(folder, overrides)
        verbosity = hf_logging.get_verbosity()
        # Missing and mismatched weights are raised below; the load report would only repeat them.
        hf_logging.set_verbosity_error()
        try:
            # float32 whatever the checkpoint holds (Qwen2.5 ships bf16): training keeps fp32 master weights and
            # mixed precision casts per op; cast the module for bf16 inference.
            model, info = AutoModelForCausalLM.from_pretrained(
                folder, config=config, dtype=torch.float32, output_loading_info=True
            )
        finally:
            hf_logging.set_verbosity(verbosity)
    except (OSError, ValueError, KeyError) as err:
        detail = " ".join(str(err).split())[:300]
        raise PretrainedLoadError(
            f"{folder} cannot be loaded as a Hugging Face causal LM ({type(err).__name__}: {detail})"
        ) from err
    problems = "; ".join(
        f"{name} {sorted(map(str, keys))[:8]}"
        for name, keys in (("missing weights", info["missing_keys"]), ("shape mismatch", info["mismatched_keys"]))
        if keys
    )
    if problems:
        raise PretrainedLoadError(f"{folder} does not fit its config.json: {problems}")
    return model


def _preset_config(preset: str | None, overrides: dict[str, Any], tokenizer: Any) -> PretrainedConfig:
    base = preset_values("HFCausalLM", LM_PRESETS, preset)
    values = {
        **base,
        # At least one row per token; a preset may pad beyond that (Qwen2.5's 151,936 rows for 151,665 tokens).
        "vocab_size": max(base.get("vocab_size", 0), len(tokenizer)),
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        **overrides,
    }
    return AutoConfig.for_model(values.pop("model_type", "qwen2"), **values)


class HFCausalLM(LanguageModel):
    """Any Hugging Face ``AutoModelForCausalLM`` and its tokenizer, with Tar's image vocabulary.

    Built from a pretrained folder (a plain LM, or an already expanded Tar LM such as Tar-1.5B), or untrained
    from a preset. When ``num_codes`` is given and the vocabulary lacks image words, it is expanded at
    construction (:func:`tarkit_plugins.lm.vocab_expansion.expand_vocabulary`); when it has them, their count
    must match.
    Without ``num_codes`` a plain LM stays plain: it works as a language model, and :attr:`vocab` raises
    :class:`~tarkit.vocab.VocabularyError` until :meth:`ensure_image_vocabulary` expands it.

    ``save_pretrained(dir)`` writes a Hugging Face folder (model + tokenizer) that ``transformers`` loads alone;
    ``HFCausalLM.from_pretrained(dir)`` is ``HFCausalLM(pretrained=dir)``.

    Args:
        pretrained: a local Hugging Face causal-LM folder (``pkg:`` paths allowed), or a hub id where a hub is
            reachable; its config, weights and (if present) tokenizer are used and ``preset`` is ignored.
        preset: untrained architecture when ``pretrained`` is None: ``"tiny"`` (Qwen2, hidden 128, 4 layers,
            tied embeddings; for CPU) or ``"qwen2.5-1.5b"`` (Qwen2.5-1.5B-Instruct's shape); ``None`` starts from
            the ``Qwen2Config`` defaults. The vocabulary size follows the tokenizer.
        config: overrides of the Hugging Face config fields (e.g. ``{"num_hidden_layers": 2}``); with a preset,
            ``model_type`` picks another architecture (default ``"qwen2"``).
        tokenizer: ``"qwen2"`` (the real Qwen2.5 tokenizer, built offline), ``"bytes"`` (a 278-token byte-level
            stand-in) or a local tokenizer folder; ignored when ``pretrained`` has its own tokenizer files.
        num_codes: ``K`` image tokens ``<I0>..`` to add (the TA-Tok codebook size), or to expect in a Tar folder.
        num_scales: scale tokens ``<S0>..`` to add or expect with ``num_codes``.
        lora: fine-tune through LoRA adapters (:class:`tarkit_plugins.lm.lora.LoRA`: rank, alpha, dropout, target
            modules, whether the image words' rows train, how the LM saves) instead of every weight. They are
            added once the vocabulary has its image words (at construction, or when
            :meth:`ensure_image_vocabulary` adds them, as the LM module does), so the trained rows are the final
            ones; :attr:`model` stays the ``PreTrainedModel``, with peft's layers inside. ``pretrained`` may also
            be an adapter folder: it loads merged into the base it names.
    """

    # A saved folder holds the adapter merged in (or loads merged): it rebuilds without LoRA.
    weight_sources: ClassVar[dict[str, Any]] = {"lora": None}

    def __init__(
        self,
        pretrained: str | None = None,
        preset: str | None = "tiny",
        config: dict[str, Any] | None = None,
        tokenizer: str = QWEN2,
        num_codes: int | None = None,
        num_scales: int = 3,
        lora: LoRA | None = None,
    ):
        super().__init__()
        folder = None if pretrained is None else _hf_folder(pretrained)
        if folder is not None:
            has_tokenizer = any((folder / name).is_file() for name in TOKENIZER_FILES)
            self._tokenizer = load_tokenizer(str(folder) if has_tokenizer else tokenizer)
            self.model = _load_model(folder, dict(config or {}))
            self.model.train(self.training)  # from_pretrained returns eval mode; follow this module's mode
        else:
            self._tokenizer = load_tokenizer(tokenizer)
            self.model = AutoModelForCausalLM.from_config(_preset_config(preset, dict(config or {}), self._tokenizer))
        self._vocab: ImageVocabulary | None = None
        self.lora = lora
        # peft's wrapper around self.model, kept out of the submodules: registered, every weight would be in the
        # state dict twice (model.* and the wrapper's base_model.model.*).
        self.__dict__["peft"] = None
        has_image_words = IM_START in self._tokenizer.get_vocab()
        if lora is not None:
            lora_lib.check_lora(lora, self.model)
            if lora.save == "adapter" and not (folder is not None and has_image_words):
                raise ValueError(
                    "lora.save='adapter' needs pretrained= a folder that already has the image words (a Tar LM): an "
                    "adapter does not hold a base, nor rows this run adds; use lora.save='merged'"
                )
            self._base_folder = None if folder is None else str(folder.resolve())
        if num_codes is not None:
            self.ensure_image_vocabulary(num_codes, num_scales)
        elif lora is not None and has_image_words:
            self._add_lora()

    @property
    def tokenizer(self) -> Any:
        return self._tokenizer

    @property
    def vocab(self) -> ImageVocabulary:
        """The image vocabulary; :class:`~tarkit.vocab.VocabularyError` if the LM has none."""
        if self._vocab is None:
            self._vocab = check_vocabulary(self.model, self._tokenizer)
        return self._vocab

    def ensure_image_vocabulary(
        self, num_codes: int, num_scales: int = 3, codebook: torch.Tensor | None = None
    ) -> ImageVocabulary:
        """Expand the vocabulary with ``num_codes`` image and ``num_scales`` scale tokens (input rows from
        ``codebook [K, D]`` when ``D`` is the LM width), or check that it already has exactly those."""
        if IM_START in self._tokenizer.get_vocab():
            self._vocab = check_vocabulary(self.model, self._tokenizer, num_codes, num_scales)
        else:
            self._vocab = expand_vocabulary(self.model, self._tokenizer, num_codes, num_scales, codebook)
        if self.lora is not None and self.peft is None:
            self._add_lora()
        return self._vocab

    def _add_lora(self) -> None:
        self.__dict__["peft"] = lora_lib.add_lora(self.model, self.lora, self.vocab, self._base_folder)

    def config_dict(self) -> dict[str, Any]:
        """The constructor arguments, with the image vocabulary as it is now (it may have been expanded later)."""
        config = super().config_dict()
        if self._vocab is not None:
            config.update(num_codes=self._vocab.num_codes, num_scales=self._vocab.num_scales)
        return config

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Logits ``[B, T, V]``; ``V`` is the number of embedding rows, which may exceed ``len(tokenizer)``."""
        return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits

    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Last hidden states ``[B, T, H]`` after the final norm: ``forward`` is ``output_head`` applied to them."""
        return self.model.base_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)[0]

    @property
    def context_length(self) -> int | None:
        """The longest sequence the model is built for (its config's ``max_position_embeddings``), if it says."""
        return getattr(self.model.config, "max_position_embeddings", None)

    @property
    def output_head(self) -> nn.Module:
        """The LM head (``nn.Linear``, ``weight [V, H]``): restrict it to the image rows for image sampling. Under
        LoRA with trained image rows, a view whose weight has them written in."""
        return lora_lib.output_head(self.model.get_output_embeddings())

    def incremental_decoder(self, attention_mask: torch.Tensor) -> HFCachedDecoder:
        """The decoder stack over its KV cache, positions counting real tokens only (as HF ``generate``)."""
        return HFCachedDecoder(self.model, attention_mask)

    def save_pretrained(self, save_directory: str | os.PathLike) -> Path:
        """Write the model and tokenizer as one Hugging Face folder (the layout of the reference's Tar-1.5B); under
        LoRA, the model with the adapter merged in, or (``lora.save: adapter``) peft's adapter folder."""
        out = Path(save_directory)
        out.mkdir(parents=True, exist_ok=True)
        if self.peft is None:
            self.model.save_pretrained(out)
        elif self.lora.save == "adapter":
            lora_lib.save_adapter(self.peft, out)
        else:
            lora_lib.merged_copy(self.peft).save_pretrained(out)
        self._tokenizer.save_pretrained(out)
        return out

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, map_location: str | torch.device = "cpu") -> Self:
        """Load a Hugging Face causal-LM folder (``save_pretrained``'s, or any other)."""
        return cls(pretrained=os.fspath(path)).to(map_location)
