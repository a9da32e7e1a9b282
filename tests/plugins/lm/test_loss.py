"""The LM loss scores image targets over the image rows only, text targets over the whole vocabulary."""

import torch
from torch import nn
from torch.nn import functional as F

from tarkit.vocab import ImageVocabulary
from tarkit_plugins.lm.module import chunked_cross_entropy, image_aware_cross_entropy, reduce_token_losses

VOCAB = ImageVocabulary(im_start=20, im_end=21, scale_ids=(22, 23, 24), image_start=25, num_codes=8)


def test_image_targets_use_the_image_rows_and_order_is_kept():
    torch.manual_seed(0)
    head = nn.Linear(6, 33, bias=True)
    hidden = torch.randn(5, 6, requires_grad=True)
    targets = torch.tensor([3, 27, 21, 32, 25])  # text, image, <im_end>, image, image
    losses, correct = image_aware_cross_entropy(hidden, head, targets, VOCAB)
    logits = head(hidden)
    full = F.cross_entropy(logits, targets, reduction="none")
    restricted = F.cross_entropy(logits[:, 25:33], (targets - 25).clamp(min=0), reduction="none")
    image = VOCAB.is_image(targets)
    assert torch.allclose(losses[~image], full[~image]) and torch.allclose(losses[image], restricted[image])
    assert (losses[image] < full[image]).all()  # the image rows' softmax leaves out every text row
    assert torch.equal(correct[image], logits[image, 25:33].argmax(-1) == targets[image] - 25)
    losses.sum().backward()
    assert hidden.grad.abs().sum() > 0 and head.weight.grad[25:33].abs().sum() > 0


def test_text_only_batches_match_the_plain_loss():
    head = nn.Linear(4, 33, bias=False)
    hidden, targets = torch.randn(3, 4), torch.tensor([1, 2, 21])
    assert torch.allclose(image_aware_cross_entropy(hidden, head, targets, VOCAB)[0],
                          chunked_cross_entropy(hidden, head, targets)[0])


def test_sample_weighting_gives_every_sample_the_same_weight():
    token_loss = torch.tensor([1.0, 1.0, 1.0, 5.0], requires_grad=True)  # sample 0: three tokens, sample 2: one
    rows = torch.tensor([0, 0, 0, 2])
    assert reduce_token_losses(token_loss, rows, "token").item() == 2.0
    sample = reduce_token_losses(token_loss, rows, "sample")
    assert sample.item() == 3.0  # (mean 1 + mean 5) / 2: the row without supervised tokens does not count
    sample.backward()
    assert torch.allclose(token_loss.grad, torch.tensor([1 / 6, 1 / 6, 1 / 6, 1 / 2]))
