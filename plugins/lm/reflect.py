"""Self-reflection for text-to-image: the LM judges its own candidates by reading them back.

Tar's visual tokens are words of the LM, so the same model that drew an image can read it: the rule here is
the LM's likelihood of the prompt as the answer to a describing question about the candidate's image tokens,

    score(codes, prompt) = mean log p(prompt tokens | <image tokens> "\\n" question)

and the best-scoring of several candidates is kept. It needs nothing but the trained LM (no extra judge),
and it rewards exactly what T2I is asked for: an image from which the prompt can be read back.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from tarkit.interfaces import LanguageModel
from tarkit.prompts import IGNORE_INDEX, chat_example, image_ids, image_span, pad_examples
from tarkit.vocab import ImageVocabulary
from tarkit_plugins.lm.generation import image_head

DEFAULT_QUESTION = "Describe the image."


@torch.no_grad()
def prompt_log_likelihood(
    lm: LanguageModel,
    vocab: ImageVocabulary,
    codes: torch.Tensor,
    prompts: list[str],
    question: str = DEFAULT_QUESTION,
) -> torch.Tensor:
    """Mean per-token log-probability ``[B]`` of each prompt given its image codes ``[B, n]`` and ``question``."""
    if len(codes) != len(prompts):
        raise ValueError(f"got {len(codes)} images' codes but {len(prompts)} prompts")
    examples = [
        chat_example(lm.tokenizer, [image_ids(vocab, c.cpu()), "\n" + question], [p])
        for c, p in zip(codes, prompts, strict=True)
    ]
    hidden, targets = _teacher_forced(lm, examples)
    supervised = targets != IGNORE_INDEX
    # Only the prompt's positions reach the output head: a full [B, T, vocabulary] would be ~150k logits a token.
    logits = lm.output_head(hidden[supervised]).float()
    return _row_means(-F.cross_entropy(logits, targets[supervised], reduction="none"), supervised)


@torch.no_grad()
def image_log_likelihood(
    lm: LanguageModel, vocab: ImageVocabulary, users: list[list], codes: torch.Tensor, scale_index: int
) -> torch.Tensor:
    """Mean log-probability ``[B]`` of each row of ``codes [B, n]`` as the image the assistant draws after the user
    turn ``users[i]`` (parts, as a task formatter's ``user``), over the image tokens only, as generation samples."""
    if len(codes) != len(users):
        raise ValueError(f"got {len(codes)} images' codes but {len(users)} user turns")
    spans = [[image_span(vocab, c.cpu(), scale_index)] for c in codes]
    examples = [chat_example(lm.tokenizer, user, span) for user, span in zip(users, spans, strict=True)]
    hidden, targets = _teacher_forced(lm, examples)
    drawn = vocab.is_image(targets) & (targets != IGNORE_INDEX)
    logits = F.linear(hidden[drawn], *image_head(lm, vocab)).float()
    token_logp = logits.log_softmax(-1).gather(1, (targets[drawn] - vocab.image_start)[:, None]).squeeze(1)
    return _row_means(token_logp, drawn)


def _teacher_forced(lm: LanguageModel, examples: list[dict[str, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """The hidden states ``[B, T-1, H]`` of a padded batch of chat examples and the labels each position predicts."""
    device = next(lm.parameters()).device
    batch = {k: v.to(device) for k, v in pad_examples(examples, lm.tokenizer.pad_token_id).items()}
    return lm.hidden_states(batch["input_ids"], batch["attention_mask"])[:, :-1], batch["labels"][:, 1:]


def _row_means(token_values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The mean per row of ``mask [B, T]`` of ``token_values``, given in the order of ``mask``'s True entries."""
    rows = mask.nonzero()[:, 0]
    return torch.zeros(len(mask), device=mask.device).index_add_(0, rows, token_values) / mask.sum(1)


def best_of(scores: torch.Tensor, candidates: int) -> torch.Tensor:
    """Index (into the flat candidate list) of the best of each consecutive group of ``candidates`` scores."""
    if scores.numel() % candidates:
        raise ValueError(f"{scores.numel()} scores do not split into groups of {candidates} candidates")
    groups = scores.view(-1, candidates)
    return groups.argmax(1) + torch.arange(len(groups), device=scores.device) * candidates
