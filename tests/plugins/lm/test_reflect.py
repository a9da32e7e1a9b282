"""Self-reflection scores a candidate by the LM's likelihood of the prompt given the candidate's image tokens."""

import pytest
import torch
from torch.nn import functional as F

from tarkit.prompts import chat_example, image_ids
from tarkit_plugins.lm.reflect import best_of, prompt_log_likelihood
from tarkit_plugins.lms import HFCausalLM

SMALL = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
         "num_key_value_heads": 1}


@pytest.fixture(scope="module")
def lm():
    torch.manual_seed(0)
    model = HFCausalLM(preset="tiny", tokenizer="bytes", config=SMALL).eval()
    model.ensure_image_vocabulary(8, 3)
    return model


def test_scores_are_the_mean_log_likelihood_of_each_prompt(lm):
    codes = torch.tensor([[1, 2, 3, 4], [7, 7, 0, 0]])
    prompts = ["a red circle", "two blue squares side by side"]
    scores = prompt_log_likelihood(lm, lm.vocab, codes, prompts)
    for row, (c, p) in enumerate(zip(codes, prompts, strict=True)):
        example = chat_example(lm.tokenizer, [image_ids(lm.vocab, c), "\nDescribe the image."], [p])
        logits = lm.model(example["input_ids"][None]).logits[0, :-1]
        targets = example["labels"][1:]
        keep = targets != -100
        expected = -F.cross_entropy(logits[keep], targets[keep])
        assert torch.allclose(scores[row], expected, atol=1e-5)


def test_best_of_picks_the_best_candidate_of_each_prompt():
    scores = torch.tensor([-3.0, -1.0, -2.0, -0.5, -4.0, -0.7])
    assert best_of(scores, 3).tolist() == [1, 3]
    with pytest.raises(ValueError, match="groups of 4"):
        best_of(scores, 4)
