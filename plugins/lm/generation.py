"""Sampling from any :class:`~tarkit.interfaces.LanguageModel`: constrained image-token generation (T2I, with
CFG) and text answers.

    prompt (left-padded, ends where the assistant turn begins) + ``<im_start><S{k}>`` (teacher-forced)
        -> N steps: last hidden state @ output_head.weight[image rows].T -> (CFG) -> top-k / top-p sample
        -> feed the image token back through the LM's incremental decoder -> codes [B, N]

Only the interface is used: ``lm.incremental_decoder(mask)`` (prefill, then one cached step per token) and
``lm.output_head`` (an ``nn.Linear`` whose output is exactly the LM's logits). The caller puts the LM in
``eval()`` mode; nothing here changes its mode or needs gradients.

Restricting the head to the image rows is what makes the image span cheap: a Qwen2.5 head over ~217k tokens is
a ``[H, 217k]`` matmul per step, the 65,536 image rows a contiguous view of 30% of it, and tokens outside the
span can then never be sampled at all (no mask over the text vocabulary needed).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from tarkit.cpu_linear import cpu_linear
from tarkit.interfaces import LanguageModel
from tarkit.vocab import ImageVocabulary

__all__ = ["generate_image_codes", "generate_text", "image_head", "sample_next"]


def sample_next(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Pick one index per row of ``logits [B, V]``: greedy when ``temperature == 0``, else top-k, top-p, sample.

    Top-k keeps the ``k`` largest logits; top-p then keeps the smallest prefix of those (sorted by probability)
    whose mass reaches ``top_p`` (the most likely candidate always survives). Sampling draws one
    ``torch.multinomial`` per call from ``generator``, so equal logits and equal generator states give equal
    picks. Greedy ignores ``top_k``/``top_p`` and draws nothing from the generator. Returns int64 ``[B]``.
    """
    if logits.ndim != 2:
        raise ValueError(f"logits must be [batch, vocab], got shape {tuple(logits.shape)}")
    _check_sampling(temperature, top_k, top_p)
    if temperature == 0:
        return logits.argmax(dim=-1)

    logits = logits.float() / temperature
    if top_k is None and (top_p is None or top_p == 1):
        return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator).squeeze(-1)

    # Work on the sorted candidates only: with the reference's top_k=1200 of 65,536 image tokens, top-p then
    # sorts 1,200 values per row instead of the whole row.
    if top_k is not None and top_k < logits.shape[-1]:
        values, indices = logits.topk(top_k, dim=-1)
    else:
        values, indices = logits.sort(dim=-1, descending=True)
    if top_p is not None and top_p < 1:
        probs = values.softmax(dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs  # mass of the strictly more likely candidates
        values = values.masked_fill(mass_before >= top_p, float("-inf"))  # column 0 has mass_before 0: kept
    choice = torch.multinomial(values.softmax(dim=-1), 1, generator=generator)
    return indices.gather(-1, choice).squeeze(-1)


def _check_sampling(temperature: float, top_k: int | None, top_p: float | None) -> None:
    if not math.isfinite(temperature) or temperature < 0:
        raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {temperature}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be None or an integer >= 1, got {top_k!r}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be None or in (0, 1], got {top_p}")


@torch.no_grad()
def generate_image_codes(
    lm: LanguageModel,
    vocab: ImageVocabulary,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    num_tokens: int,
    scale_index: int,
    cfg_scale: float = 1.0,
    uncond_input_ids: torch.Tensor | None = None,
    uncond_attention_mask: torch.Tensor | None = None,
    temperature: float = 1.0,
    top_k: int | None = 1200,
    top_p: float | None = 0.95,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Generate exactly ``num_tokens`` image tokens per prompt and return them as TA-Tok codes ``[B, num_tokens]``.

    Args:
        lm: a language model with tarkit's image vocabulary (see the module docstring).
        vocab: the ids of ``<im_start>``, the scale tokens and the image tokens in ``lm``'s vocabulary.
        input_ids, attention_mask: ``[B, T]`` left-padded prompts that end where the assistant turn begins;
            ``<im_start><S{scale_index}>`` is appended here.
        num_tokens: image tokens to generate (729/169/81 at scales 1/2/3 in the reference).
        scale_index: ``k`` of the ``<S{k}>`` token that opens the image.
        cfg_scale: classifier-free guidance; ``uncond + cfg_scale * (cond - uncond)`` over the image logits.
            At 1.0 the unconditional prompt is not run at all, so the result equals unguided sampling.
        uncond_input_ids, uncond_attention_mask: ``[B or 1, T']`` left-padded unconditional prompts (the chat with
            an empty user prompt); required when ``cfg_scale != 1``. Any length: both batches are left-padded to
            a common length and run as one batch of ``2B`` rows.
        temperature, top_k, top_p, generator: sampling, see :func:`sample_next` (reference: 1.0, 1200, 0.95).

    The image span admits only image tokens: logits are computed for the image rows of the output head alone,
    so every step yields a valid code whatever the model prefers. ``<im_end>`` is not generated (the caller knows
    the span ends after ``num_tokens``). Returns int64 codes in ``[0, vocab.num_codes)`` on the head's device.
    """
    _check_prompts(input_ids, attention_mask, "input_ids", "attention_mask")
    if num_tokens < 1:
        raise ValueError(f"num_tokens must be >= 1, got {num_tokens}")
    if not 0 <= scale_index < vocab.num_scales:
        raise ValueError(f"scale_index must be in [0, {vocab.num_scales}), got {scale_index}")
    if not math.isfinite(cfg_scale):
        raise ValueError(f"cfg_scale must be finite, got {cfg_scale}")
    if (uncond_input_ids is None) != (uncond_attention_mask is None):
        raise ValueError("pass both uncond_input_ids and uncond_attention_mask, or neither")
    if cfg_scale != 1 and uncond_input_ids is None:
        raise ValueError(f"cfg_scale={cfg_scale} needs the unconditional prompt (uncond_input_ids/_attention_mask)")
    _check_sampling(temperature, top_k, top_p)

    weight, bias = image_head(lm, vocab)
    batch, device = input_ids.shape[0], weight.device
    opening = torch.tensor([vocab.im_start, vocab.scale_ids[scale_index]], device=device)

    ids, mask = _append(input_ids.to(device), attention_mask.to(device), opening)
    guided = cfg_scale != 1
    if guided:
        _check_prompts(uncond_input_ids, uncond_attention_mask, "uncond_input_ids", "uncond_attention_mask")
        if uncond_input_ids.shape[0] not in (1, batch):
            raise ValueError(f"uncond_input_ids has batch {uncond_input_ids.shape[0]}, expected 1 or {batch}")
        u_ids, u_mask = _append(uncond_input_ids.to(device), uncond_attention_mask.to(device), opening)
        u_ids, u_mask = u_ids.expand(batch, -1), u_mask.expand(batch, -1)
        length = max(ids.shape[1], u_ids.shape[1])
        # One forward of 2B rows per step: rows [0, B) are conditional, rows [B, 2B) unconditional.
        ids = torch.cat([_left_pad(ids, length), _left_pad(u_ids, length)])
        mask = torch.cat([_left_pad(mask, length), _left_pad(u_mask, length)])

    decoder = lm.incremental_decoder(mask)
    hidden = decoder.prefill(ids)
    picked = []
    for step in range(num_tokens):
        logits = cpu_linear(hidden, weight, bias).float()  # [R, K]
        if guided:
            cond, uncond = logits[:batch], logits[batch:]
            logits = uncond + cfg_scale * (cond - uncond)
        # The same [B, K] sampling call with or without guidance: the generator advances identically.
        token = sample_next(logits, temperature, top_k, top_p, generator) + vocab.image_start
        picked.append(token)
        if step + 1 < num_tokens:  # the last token's hidden state is never needed
            hidden = decoder.step(token.repeat(2) if guided else token)  # one token feeds both halves
    return vocab.ids_to_codes(torch.stack(picked, dim=1))


@torch.no_grad()
def generate_text(
    lm: LanguageModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    max_new_tokens: int,
    eos_token_ids: list[int],
    banned_token_ids: tuple[int, int] | None = None,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> list[list[int]]:
    """Continue left-padded prompts ``[B, T]``; return each row's new token ids, ending at its first eos.

    A row stops at the first token in ``eos_token_ids`` (included in its list, as ``transformers``'s
    ``generate`` does) or after ``max_new_tokens``; generation ends when every row has stopped.
    ``banned_token_ids = (start, end)`` forbids the ids in ``[start, end)``, e.g. the image tokens when
    answering a question. Greedy by default; the sampling arguments are those of :func:`sample_next`.
    """
    _check_prompts(input_ids, attention_mask, "input_ids", "attention_mask")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    _check_sampling(temperature, top_k, top_p)
    weight, bias = _output_head(lm)
    vocab_size = weight.shape[0]
    if banned_token_ids is not None:
        start, end = banned_token_ids
        if not 0 <= start < end <= vocab_size or end - start == vocab_size:
            raise ValueError(
                f"banned_token_ids must be a non-empty [start, end) inside [0, {vocab_size}) "
                f"that leaves some token allowed, got {banned_token_ids}"
            )
        if any(start <= eos < end for eos in eos_token_ids):
            raise ValueError(f"an eos token id {eos_token_ids} lies in banned_token_ids {banned_token_ids}")

    batch, device = input_ids.shape[0], weight.device
    new_tokens: list[list[int]] = [[] for _ in range(batch)]
    if max_new_tokens == 0:
        return new_tokens
    eos = torch.tensor(list(eos_token_ids), dtype=torch.long, device=device)
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    decoder = lm.incremental_decoder(attention_mask.to(device))
    hidden = decoder.prefill(input_ids.to(device))
    for step in range(max_new_tokens):
        logits = _text_logits(hidden, weight, bias, banned_token_ids)  # [B, V], the last position only
        token = sample_next(logits, temperature, top_k, top_p, generator)
        for row, (value, done) in enumerate(zip(token.tolist(), finished.tolist(), strict=True)):
            if not done:
                new_tokens[row].append(value)
        finished |= torch.isin(token, eos)
        if bool(finished.all()) or step + 1 == max_new_tokens:
            break
        # Finished rows keep decoding (their tokens are dropped): the batch stays rectangular.
        hidden = decoder.step(token)
    return new_tokens


def _text_logits(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, banned: tuple[int, int] | None
) -> torch.Tensor:
    """Float logits ``[B, V]`` with ``-inf`` on the banned ids, whose head rows are never multiplied: a question's
    answer skips the 65,536 image rows, 30% of a Qwen2.5 head with Tar's vocabulary."""
    if banned is None:
        return cpu_linear(hidden, weight, bias).float()
    start, end = banned
    logits = hidden.new_full((hidden.shape[0], weight.shape[0]), float("-inf"), dtype=torch.float32)
    for rows in (slice(0, start), slice(end, weight.shape[0])):
        if rows.start < rows.stop:
            logits[:, rows] = cpu_linear(hidden, weight[rows], None if bias is None else bias[rows]).float()
    return logits


def image_head(lm: LanguageModel, vocab: ImageVocabulary) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The output head's image rows, ``weight [K, H]`` and ``bias [K]`` (or None): logits over the image tokens
    alone, code ``k`` in column ``k``, as image-token sampling and scoring read them."""
    weight, bias = _output_head(lm)
    if vocab.image_end > weight.shape[0]:
        raise ValueError(f"the model's head has {weight.shape[0]} rows, the image tokens end at {vocab.image_end}")
    rows = slice(vocab.image_start, vocab.image_end)
    return weight[rows], None if bias is None else bias[rows]


def _output_head(lm: LanguageModel) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``weight [V, H]`` and ``bias [V]`` (or None) of the LM's output head."""
    head = lm.output_head
    if not isinstance(head, nn.Linear):
        raise ValueError(f"{type(lm).__name__}.output_head is not an nn.Linear head: {type(head).__name__}")
    return head.weight, head.bias


def _check_prompts(input_ids: Any, attention_mask: Any, ids_name: str, mask_name: str) -> None:
    if not isinstance(input_ids, torch.Tensor) or input_ids.ndim != 2 or input_ids.shape[1] == 0:
        raise ValueError(f"{ids_name} must be a non-empty [batch, length] tensor")
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.shape != input_ids.shape:
        raise ValueError(f"{mask_name} must have the shape of {ids_name} {tuple(input_ids.shape)}")
    if not bool((attention_mask[:, -1] != 0).all()):
        raise ValueError(f"prompts must be left-padded: the last column of {mask_name} has padding")


def _append(ids: torch.Tensor, mask: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Append the same real ``tokens`` to every row of a left-padded batch."""
    tail = tokens.to(ids.dtype).expand(ids.shape[0], -1)
    return torch.cat([ids, tail], dim=1), torch.cat([mask, torch.ones_like(tail, dtype=mask.dtype)], dim=1)


def _left_pad(tensor: torch.Tensor, length: int) -> torch.Tensor:
    """Left-pad ``[R, T]`` with zeros to ``[R, length]``: id 0 under mask 0 is never attended to."""
    return F.pad(tensor, (length - tensor.shape[1], 0), value=0)
