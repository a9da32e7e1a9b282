"""Expanding any Hugging Face causal LM with Tar's image words, and checking that a model+tokenizer pair has them.

:func:`expand_vocabulary` appends, after the tokenizer's last token and in the reference's order, ``<im_start>``
and ``<im_end>`` (special tokens), the scale tokens ``<S0>..<S{n-1}>`` and the image tokens ``<I0>..<I{K-1}>``,
so every id is contiguous and code ``c`` is token ``image_start + c``. The embedding matrix (and an untied
output head) grows to fit; the rows of existing tokens are kept bit for bit.

Ids versus rows: a model may have more embedding rows than its tokenizer has tokens (Qwen2 pads 151,665 tokens
to 151,936 rows). New tokens still take ids ``len(tokenizer)``, ``len(tokenizer) + 1``, ... (that is what
the tokenizer assigns); the padding rows they land on are initialised like every new row, the matrix then
grows to ``max(rows, len(tokenizer))`` rows and never shrinks. Adding the paper's 65,541 words to the Qwen2.5
vocabulary (2 + 3 scales + 65,536 codes) gives 217,206 tokens and rows.
"""

from __future__ import annotations

from typing import Any

import torch
from tokenizers import AddedToken
from transformers import PreTrainedModel

from tarkit.vocab import IM_END, IM_START, ImageVocabulary, VocabularyError, image_token, scale_token

__all__ = ["check_vocabulary", "expand_vocabulary"]


def orthonormal_map(codebook: torch.Tensor, width: int, seed: int = 0) -> torch.Tensor:
    """``codebook [K, D]`` -> ``[K, width]`` through a fixed random map with orthonormal columns (or rows): into a
    wider space it keeps every inner product and distance; into a narrower one it is a random projection."""
    dim = codebook.shape[1]
    gaussian = torch.randn(max(dim, width), min(dim, width), generator=torch.Generator().manual_seed(seed))
    basis = torch.linalg.qr(gaussian).Q  # orthonormal columns
    mapping = basis.T if dim < width else basis  # [D, width]
    return codebook.float() @ mapping


def expand_vocabulary(
    model: PreTrainedModel,
    tokenizer: Any,
    num_codes: int,
    num_scales: int = 3,
    codebook: torch.Tensor | None = None,
) -> ImageVocabulary:
    """Add Tar's image words to ``tokenizer`` and matching embedding rows to ``model`` (both changed in place).

    Args:
        model: a ``transformers`` ``PreTrainedModel`` (``get_input_embeddings`` / ``get_output_embeddings``),
            whose embedding has at least ``len(tokenizer)`` rows.
        tokenizer: its Hugging Face tokenizer, without any of the words to add.
        num_codes: ``K``, the TA-Tok codebook size (the paper's 65,536).
        num_scales: how many scale tokens ``<S0>..`` (the paper's 3: pool scales 1, 2, 3).
        codebook: the TA-Tok codebook ``[K, D]``: image-token input rows are copied from it (with tied
            embeddings the output rows are the same matrix), through :func:`orthonormal_map` when ``D`` is not
            the LM width, so distinct codes start as distinct rows at the codebook's distances.

    New rows are the mean of the existing tokens' rows (input and output matrices separately; an output bias
    likewise). Returns the new :class:`ImageVocabulary`.
    """
    if num_codes < 1 or num_scales < 1:
        raise ValueError(f"num_codes and num_scales must be positive, got {num_codes} and {num_scales}")
    words = [IM_START, IM_END, *map(scale_token, range(num_scales)), *map(image_token, range(num_codes))]
    existing = tokenizer.get_vocab()
    present = [w for w in words if w in existing]
    if present:
        raise VocabularyError(
            f"the tokenizer already has {', '.join(present[:4])}{' ...' if len(present) > 4 else ''}: it is (partly) "
            "expanded; check it with tarkit_plugins.lm.vocab_expansion.check_vocabulary instead of expanding it again"
        )
    base = len(tokenizer)
    input_embeddings = model.get_input_embeddings()
    rows, width = input_embeddings.weight.shape
    if rows < base:
        raise VocabularyError(f"the model has {rows} embedding rows for a tokenizer of {base} tokens: not a pair")
    if codebook is not None:
        if codebook.ndim != 2 or codebook.shape[0] != num_codes:
            raise ValueError(f"codebook must be [num_codes={num_codes}, D], got shape {tuple(codebook.shape)}")
        if codebook.shape[1] != width:
            codebook = orthonormal_map(codebook, width)

    # The arguments are checked: only now do tokenizer and model change. <im_start>/<im_end> are special (decode
    # with skip_special_tokens drops them); scale and image tokens are plain added tokens, as in the reference.
    tokenizer.add_special_tokens({"extra_special_tokens": [IM_START, IM_END]}, replace_extra_special_tokens=False)
    # One call for all of them (~0.2 s for 65,539 strings); one call per string is hundreds of times slower.
    tokenizer.add_tokens([AddedToken(w, special=False, normalized=False) for w in words[2:]])
    vocab = ImageVocabulary.from_tokenizer(tokenizer)
    expected = (base, base + 1, tuple(range(base + 2, base + 2 + num_scales)), base + 2 + num_scales, num_codes)
    if (vocab.im_start, vocab.im_end, vocab.scale_ids, vocab.image_start, vocab.num_codes) != expected:
        raise VocabularyError(f"the tokenizer gave the new words ids {vocab}, not {base}.. in order")

    end, new_rows = len(tokenizer), max(rows, len(tokenizer))
    input_embeddings.weight.data = _grown(input_embeddings.weight.data, base, end, new_rows)
    if codebook is not None:
        input_embeddings.weight.data[vocab.image_start : vocab.image_end] = codebook.to(input_embeddings.weight)
    input_embeddings.num_embeddings = new_rows
    head = model.get_output_embeddings()
    if head is not None:
        # Tied weights share one Parameter: growing the input rows above already grew the head.
        if head.weight is not input_embeddings.weight:
            head.weight.data = _grown(head.weight.data, base, end, new_rows)
        if getattr(head, "bias", None) is not None:
            head.bias.data = _grown(head.bias.data, base, end, new_rows)
        if hasattr(head, "out_features"):
            head.out_features = new_rows
    model.config.get_text_config().vocab_size = new_rows
    if hasattr(model, "vocab_size"):
        model.vocab_size = new_rows
    return vocab


def _grown(weight: torch.Tensor, base: int, end: int, rows: int) -> torch.Tensor:
    """A copy of ``weight`` with ``rows`` rows: rows ``base..end-1`` (the new tokens) set to the mean of rows
    ``..base-1`` (the existing tokens), every other row of ``weight`` kept."""
    grown = weight.new_empty(rows, *weight.shape[1:])
    grown[: len(weight)] = weight
    # The mean in float32: a bf16 running sum over 150k rows would lose most of its digits.
    grown[base:end] = weight[:base].float().mean(dim=0).to(weight.dtype)
    return grown


def check_vocabulary(
    model: PreTrainedModel, tokenizer: Any, num_codes: int | None = None, num_scales: int | None = None
) -> ImageVocabulary:
    """The image vocabulary of a model+tokenizer pair (e.g. a loaded Tar folder), or a clear error.

    Raises :class:`VocabularyError` when the tokenizer lacks the image words, when ``num_codes``/``num_scales``
    are given and differ, or when the model's embedding or output head has no rows for some of the words.
    """
    vocab = ImageVocabulary.from_tokenizer(tokenizer)
    if num_codes is not None and vocab.num_codes != num_codes:
        raise VocabularyError(
            f"the tokenizer has {vocab.num_codes} image tokens but {num_codes} were asked for: use the TA-Tok "
            "this LM was expanded for, or start from an unexpanded LM"
        )
    if num_scales is not None and vocab.num_scales != num_scales:
        raise VocabularyError(f"the tokenizer has {vocab.num_scales} scale tokens but {num_scales} were asked for")
    needed = 1 + max(vocab.im_start, vocab.im_end, *vocab.scale_ids, vocab.image_end - 1)
    matrices = {"input embedding": model.get_input_embeddings(), "output head": model.get_output_embeddings()}
    for name, module in matrices.items():
        if module is not None and module.weight.shape[0] < needed:
            raise VocabularyError(
                f"the model's {name} has {module.weight.shape[0]} rows but the tokenizer's image words reach id "
                f"{needed - 1}: this model was not expanded with this tokenizer (save and load them together)"
            )
    return vocab
