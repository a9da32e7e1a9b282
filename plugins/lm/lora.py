"""LoRA fine-tuning of a Hugging Face causal LM through ``peft``, with Tar's image-word rows trainable.

``HFCausalLM(lora=LoRA(...))`` (or a ``lora:`` block under the LM's ``init_args`` in a recipe, see
``recipes/finetune/lora.yaml``) injects peft's LoRA layers into the model's linear layers, in place: the model stays
the ``PreTrainedModel`` (``Qwen2ForCausalLM``), its base weights frozen. The rows of the image words (``<im_start>``,
``<im_end>``, ``<S*>``, ``<I*>``) of the input embedding and the output head train through peft's
``trainable_token_indices``: a ``[n_rows, H]`` parameter whose values replace those rows (tied embeddings: one
parameter for both; untied: one per matrix), so ~1k rows train instead of the ~153k-217k-row matrix that
``modules_to_save`` would copy and train.

A LoRA LM saves as a merged plain Hugging Face folder (``save: merged``, which ``Qwen2ForCausalLM.from_pretrained``
loads alone) or as peft's adapter folder (``save: adapter``): ``adapter_config.json`` naming the base folder,
``adapter_model.safetensors`` (LoRA factors and the image-word rows) and the tokenizer. Load the adapter with
``PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), folder)`` or through tarkit
(``HFCausalLM(pretrained=folder)``, the pipelines), which merges it.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.utils.other import TrainableTokensWrapper
from torch import nn
from torch.nn import functional as F
from transformers import PreTrainedModel

from tarkit.vocab import ImageVocabulary

SAVE_MODES = ("merged", "adapter")
ADAPTER_CONFIG = "adapter_config.json"


@dataclass
class LoRA:
    """LoRA settings of an ``HFCausalLM`` (a recipe's ``lora:`` block).

    Args:
        r: the adapter rank (each target ``W [out, in]`` gains ``B [out, r] @ A [r, in]``).
        alpha: the update is scaled by ``alpha / r``.
        dropout: dropout on the adapter's input.
        target_modules: names of the linear layers to adapt (``q_proj``, ``down_proj`` ... for Qwen2: a module
            matches when its name ends with one), or ``"all-linear"``: every linear layer but the output head, for
            any architecture. The output head cannot be a target: its image rows train with ``image_rows``.
        image_rows: train the image words' rows of the embedding and the output head (peft's
            ``trainable_token_indices``); ``False`` freezes them with the rest of the base.
        save: ``merged`` writes the LM with the adapter merged in, a plain Hugging Face folder; ``adapter`` writes
            peft's adapter folder alone, which needs ``pretrained`` to be a folder that already has the image words.
    """

    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    target_modules: list[str] | str = "all-linear"
    image_rows: bool = True
    save: str = "merged"


def check_lora(settings: LoRA, model: PreTrainedModel) -> None:
    """One-line ``ValueError`` for settings that cannot adapt ``model``."""
    if not isinstance(settings.r, int) or settings.r <= 0:
        raise ValueError(f"lora.r must be a positive integer (the adapter rank, e.g. 16), got {settings.r!r}")
    if settings.alpha <= 0:
        raise ValueError(f"lora.alpha must be positive (the update is scaled by alpha / r), got {settings.alpha!r}")
    if not 0 <= settings.dropout < 1:
        raise ValueError(f"lora.dropout must be in [0, 1), got {settings.dropout!r}")
    if settings.save not in SAVE_MODES:
        raise ValueError(f"lora.save must be one of {', '.join(SAVE_MODES)}, got {settings.save!r}")
    targets = settings.target_modules
    if isinstance(targets, str):
        if targets != "all-linear":
            raise ValueError(f"lora.target_modules must be a list of module names or 'all-linear', got {targets!r}")
        return
    if not targets:
        raise ValueError("lora.target_modules is empty; name the linear layers to adapt, or use 'all-linear'")
    names = [name for name, _ in model.named_modules()]
    missing = [t for t in targets if not any(n == t or n.endswith(f".{t}") for n in names)]
    linears = sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, nn.Linear)})
    if missing:
        raise ValueError(
            f"lora.target_modules {missing} match no module of {type(model).__name__}; its linear layers are "
            f"named {linears}, or use 'all-linear'"
        )
    head_name = _module_name(model, model.get_output_embeddings())
    if any(head_name == t or head_name.endswith(f".{t}") for t in targets):
        raise ValueError(
            f"lora.target_modules must not include the output head {head_name!r}: its image rows train with "
            "lora.image_rows, and generation reads the head's weight directly"
        )


def _module_name(model: nn.Module, module: nn.Module | None) -> str:
    return next((name for name, m in model.named_modules() if m is module), "")


def image_word_ids(vocab: ImageVocabulary) -> list[int]:
    """The ids of every image word: ``<im_start>``, ``<im_end>``, the scale tokens and the image tokens."""
    return [vocab.im_start, vocab.im_end, *vocab.scale_ids, *range(vocab.image_start, vocab.image_end)]


def add_lora(
    model: PreTrainedModel, settings: LoRA, vocab: ImageVocabulary | None, base: str | None = None
) -> PeftModel:
    """Inject LoRA into ``model`` in place (its base weights frozen) and return peft's wrapper around it.

    With ``settings.image_rows`` and a ``vocab``, the image words' rows train: tied embeddings share one row
    parameter (peft ties the head's to the embedding's), untied ones get one per matrix. ``base`` is the folder
    an adapter folder will name as its base.
    """
    check_lora(settings, model)
    rows = None
    if settings.image_rows and vocab is not None:
        ids = image_word_ids(vocab)
        embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
        tied = head is None or head.weight is embedding.weight
        rows = ids if tied else {_module_name(model, embedding): ids, _module_name(model, head): ids}
    config = LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=settings.target_modules,
        trainable_token_indices=rows,
        task_type="CAUSAL_LM",
        base_model_name_or_path=base,
    )
    return get_peft_model(model, config)


def merged_copy(peft_model: PeftModel) -> PreTrainedModel:
    """A plain model with the adapter merged in; ``peft_model`` (still training, maybe) is left as it is. The copy
    holds the model twice in memory for the export: merging in place and unmerging after would not give the base
    weights back bit for bit (``W + BA - BA``)."""
    return copy.deepcopy(peft_model).merge_and_unload()


def save_adapter(peft_model: PeftModel, folder: Path) -> None:
    """peft's adapter folder: the LoRA factors and the image-word rows, not the base (named in its config)."""
    # The image rows are in the adapter (trainable tokens); "auto" would also save whole embedding matrices
    # when it guesses the vocabulary was resized, which is what the adapter exists to avoid.
    peft_model.save_pretrained(folder, save_embedding_layers=False)


def is_adapter_folder(folder: Path) -> bool:
    """Whether ``folder`` is a peft adapter folder (``save: adapter``'s) rather than a whole model."""
    return (folder / ADAPTER_CONFIG).is_file() and not (folder / "config.json").is_file()


def adapter_base(folder: Path) -> str:
    """The base folder an adapter folder names (``base_model_name_or_path``)."""
    base = json.loads((folder / ADAPTER_CONFIG).read_text()).get("base_model_name_or_path")
    if not base:
        raise ValueError(f"{folder / ADAPTER_CONFIG} names no base_model_name_or_path; it cannot be loaded alone")
    return base


def merge_adapter_folder(model: PreTrainedModel, folder: Path) -> PreTrainedModel:
    """``model`` (the adapter's base) with the adapter folder merged in, a plain model."""
    return PeftModel.from_pretrained(model, folder).merge_and_unload()


def output_head(head: nn.Module) -> nn.Module:
    """The model's output head as an ``nn.Linear`` whose weight holds the trained rows (see :class:`TokenRowsHead`)."""
    return TokenRowsHead(head) if isinstance(head, TrainableTokensWrapper) else head


class TokenRowsHead(nn.Linear):
    """The output head as the ``nn.Linear`` tarkit reads (the image-row loss, generation) when peft trains some of
    its rows: ``weight`` is the base matrix with the trained rows written in, computed on each access so gradients
    reach them (peft's wrapper is no ``nn.Linear``, and its base layer's weight lacks the trained rows)."""

    def __init__(self, wrapper: nn.Module):
        nn.Module.__init__(self)  # no parameters of its own: they are the wrapper's
        self.wrapper = wrapper
        base = wrapper.original_module  # the head peft wraps
        self.out_features, self.in_features = base.weight.shape

    @property
    def weight(self) -> torch.Tensor:
        return self.wrapper.weight  # peft's merged weights: the base rows, the trained rows written in

    @property
    def bias(self) -> torch.Tensor | None:
        return self.wrapper.original_module.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)
