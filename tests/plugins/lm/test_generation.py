"""tarkit_plugins.lm.generation on a tiny random Qwen2 whose vocabulary ends in a hand-made image vocabulary,
driven through the LanguageModel interface with the HF LM plugin's cached decoder."""

import pytest
import torch
from torch import nn
from transformers import Qwen2Config, Qwen2ForCausalLM

import tarkit_plugins.lm.generation as generation
from tarkit.interfaces import IncrementalDecoder, LanguageModel
from tarkit.vocab import ImageVocabulary
from tarkit_plugins.lm.cached_decoder import HFCachedDecoder
from tarkit_plugins.lm.generation import generate_image_codes, generate_text, sample_next

BASE, K = 100, 40  # text ids 0..99, <im_start>=100, <im_end>=101, <S0..S2>=102..104, images 105..144
VOCAB = ImageVocabulary(im_start=100, im_end=101, scale_ids=(102, 103, 104), image_start=105, num_codes=K)
IMAGES = slice(VOCAB.image_start, VOCAB.image_end)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny matmuls gain nothing from threads, and on a busy 2-core box spinning OpenMP threads cost seconds."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_lm(seed: int = 0) -> Qwen2ForCausalLM:
    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=VOCAB.image_end,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        initializer_range=0.3,  # sharp attention: positions and masks visibly change the outputs
        tie_word_embeddings=False,
    )
    return Qwen2ForCausalLM(config).eval()


class GenerationOnlyLM(LanguageModel):
    """The interface with only what generation uses implemented by subclasses (no tokenizer, no training)."""

    tokenizer = vocab = None  # generation needs neither

    def ensure_image_vocabulary(self, *args, **kwargs):
        raise NotImplementedError

    def forward(self, input_ids, attention_mask=None):
        raise NotImplementedError

    def hidden_states(self, input_ids, attention_mask=None):
        raise NotImplementedError


class BareLM(GenerationOnlyLM):
    """The generation half of the interface over a bare HF model (no tokenizer), as ``HFCausalLM`` builds it."""

    def __init__(self, model: Qwen2ForCausalLM):
        super().__init__()
        self.model = model

    @property
    def output_head(self) -> nn.Module:
        return self.model.lm_head

    def incremental_decoder(self, attention_mask: torch.Tensor) -> HFCachedDecoder:
        return HFCachedDecoder(self.model, attention_mask)


def with_biased_head(model: Qwen2ForCausalLM, rows: slice, bias: float = 1e4) -> Qwen2ForCausalLM:
    """Swap in a head with a bias that makes the untrained model all but certain to pick a token in ``rows``."""
    old = model.lm_head
    head = nn.Linear(old.in_features, old.out_features, bias=True)
    with torch.no_grad():
        head.weight.copy_(old.weight)
        head.bias.zero_()
        head.bias[rows] = bias
    model.lm_head = head
    return model


def left_pad(prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    length = max(len(p) for p in prompts)
    ids = torch.tensor([[7] * (length - len(p)) + p for p in prompts])  # pad id 7 is a real word: must be masked
    mask = torch.tensor([[0] * (length - len(p)) + [1] * len(p) for p in prompts])
    return ids, mask


def random_prompts(lengths: list[int], seed: int = 1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, BASE, (n,), generator=g).tolist() for n in lengths]


@torch.no_grad()
def reference_codes(model, prompt, num_tokens, scale, cfg_scale=1.0, uncond=None) -> list[int]:
    """Greedy image codes for ONE unpadded prompt, recomputing the full sequence every step (no KV cache)."""
    opening = [VOCAB.im_start, VOCAB.scale_ids[scale]]
    sequences = [prompt + opening] + ([uncond + opening] if uncond is not None else [])
    codes = []
    for _ in range(num_tokens):
        logits = [model(torch.tensor([s])).logits[0, -1, IMAGES] for s in sequences]
        guided = logits[0] if uncond is None else logits[1] + cfg_scale * (logits[0] - logits[1])
        code = int(guided.argmax())
        codes.append(code)
        for s in sequences:
            s.append(VOCAB.image_start + code)
    return codes


# --- sample_next ---------------------------------------------------------------------------------------------


def test_sample_next_greedy_top_k_1_and_tiny_top_p_are_argmax():
    logits = torch.randn(64, 50, generator=torch.Generator().manual_seed(0))
    best = logits.argmax(-1)
    g = torch.Generator().manual_seed(0)
    state = g.get_state()
    assert torch.equal(sample_next(logits, 0.0, top_k=5, top_p=0.5, generator=g), best)
    assert torch.equal(g.get_state(), state)  # greedy draws nothing
    assert torch.equal(sample_next(logits, 1.0, top_k=1, generator=g), best)
    assert torch.equal(sample_next(logits, 1.0, top_p=1e-6, generator=g), best)
    assert torch.equal(sample_next(logits, 1.5, top_k=1000, top_p=1e-6, generator=g), best)
    assert not torch.equal(sample_next(logits, 1.0, generator=g), best)  # plain sampling is not argmax


def test_sample_next_top_k_and_top_p_keep_exactly_their_candidates():
    probs = torch.tensor([0.05, 0.5, 0.3, 0.15])
    logits = probs.log().expand(4000, -1)
    g = torch.Generator().manual_seed(0)
    assert set(sample_next(logits, 1.0, top_k=2, generator=g).tolist()) == {1, 2}
    assert set(sample_next(logits, 1.0, top_p=0.7, generator=g).tolist()) == {1, 2}  # 0.5 < 0.7 <= 0.8
    assert set(sample_next(logits, 1.0, top_p=0.81, generator=g).tolist()) == {1, 2, 3}
    assert set(sample_next(logits, 1.0, top_k=3, top_p=0.5, generator=g).tolist()) == {1}
    assert set(sample_next(logits, 1.0, generator=g).tolist()) == {0, 1, 2, 3}
    picks = sample_next(logits, 1.0, top_k=2, generator=g)
    assert abs((picks == 1).float().mean().item() - 0.5 / 0.8) < 0.03  # renormalised over the survivors


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"temperature": -1.0}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"top_k": 0}, "top_k"),
        ({"top_k": 2.5}, "top_k"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
    ],
)
def test_sample_next_rejects_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        sample_next(torch.zeros(2, 5), **{"temperature": 1.0, **kwargs})


def test_sample_next_rejects_non_2d_logits():
    with pytest.raises(ValueError, match="batch, vocab"):
        sample_next(torch.zeros(5), 1.0)


# --- generate_image_codes ------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_tokens, lengths, scale", [(1, [4], 0), (9, [3, 6, 5], 1), (16, [2, 8], 2)])
def test_image_generation_always_yields_exactly_n_valid_codes(num_tokens, lengths, scale):
    model = with_biased_head(tiny_lm(), slice(0, VOCAB.image_start))  # text, <im_start/end> and <S> dominate
    ids, mask = left_pad(random_prompts(lengths))
    full = torch.cat([ids, torch.tensor([[VOCAB.im_start, VOCAB.scale_ids[scale]]] * len(lengths))], 1)
    with torch.no_grad():
        assert (model(full).logits[:, -1].argmax(-1) < VOCAB.image_start).all()  # unconstrained: never an image
    for top_k, top_p in [(1200, 0.95), (None, None), (3, None)]:
        codes = generate_image_codes(
            BareLM(model),
            VOCAB,
            ids,
            mask,
            num_tokens,
            scale,
            top_k=top_k,
            top_p=top_p,
            generator=torch.Generator().manual_seed(0),
        )
        assert codes.shape == (len(lengths), num_tokens) and codes.dtype == torch.int64
        assert ((codes >= 0) & (codes < K)).all()


def test_image_row_logits_equal_full_vocabulary_logits(monkeypatch):
    model = with_biased_head(tiny_lm(), slice(90, 120), bias=0.5)  # a bias, straddling the image rows
    prompts = random_prompts([5, 3])
    ids, mask = left_pad(prompts)
    seen = []
    monkeypatch.setattr(generation, "sample_next", lambda logits, *a: seen.append(logits) or logits.argmax(-1))
    codes = generate_image_codes(BareLM(model), VOCAB, ids, mask, num_tokens=2, scale_index=1)
    assert len(seen) == 2 and seen[0].shape == (2, K)
    with torch.no_grad():
        for row, prompt in enumerate(prompts):
            sequence = prompt + [VOCAB.im_start, VOCAB.scale_ids[1], VOCAB.image_start + int(codes[row, 0])]
            full = model(torch.tensor([sequence])).logits[0, -2:, IMAGES]  # the two steps' positions
            torch.testing.assert_close(seen[0][row], full[0], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(seen[1][row], full[1], rtol=1e-5, atol=1e-5)


def test_kv_cache_decoding_equals_full_recomputation():
    model = tiny_lm()
    prompts = random_prompts([6, 2, 4])
    codes = generate_image_codes(BareLM(model), VOCAB, *left_pad(prompts), num_tokens=12, scale_index=0, temperature=0)
    for row, prompt in enumerate(prompts):
        assert codes[row].tolist() == reference_codes(model, prompt, 12, 0)


def test_left_padded_batch_equals_each_prompt_alone():
    model = tiny_lm(seed=3)
    prompts = random_prompts([3, 9], seed=5)
    batched = generate_image_codes(
        BareLM(model), VOCAB, *left_pad(prompts), num_tokens=10, scale_index=2, temperature=0
    )
    for row, prompt in enumerate(prompts):
        alone = generate_image_codes(
            BareLM(model), VOCAB, *left_pad([prompt]), num_tokens=10, scale_index=2, temperature=0
        )
        assert torch.equal(batched[row], alone[0])


def test_positions_count_real_tokens_only():
    """Like HF generate: a row's first real token is position 0, however much left padding the batch gives it.

    (RoPE is shift-invariant, so the outputs alone barely show this; an absolute-position model would.)
    """
    model = tiny_lm()
    positions = []
    model.model.register_forward_pre_hook(
        lambda _, args, kwargs: positions.append(kwargs["position_ids"].tolist()), with_kwargs=True
    )
    generate_image_codes(
        BareLM(model), VOCAB, *left_pad(random_prompts([2, 4])), num_tokens=3, scale_index=0, temperature=0
    )
    assert positions[0] == [[0, 0, 0, 1, 2, 3], [0, 1, 2, 3, 4, 5]]  # prompt + <im_start><S0>; pads clamped to 0
    assert positions[1:] == [[[4], [6]], [[5], [7]]]


def test_cfg_scale_one_is_plain_sampling_with_the_same_random_draws():
    model = tiny_lm()
    ids, mask = left_pad(random_prompts([4, 7]))
    u_ids, u_mask = left_pad(random_prompts([3], seed=9))
    g_plain, g_cfg = torch.Generator().manual_seed(11), torch.Generator().manual_seed(11)
    plain = generate_image_codes(BareLM(model), VOCAB, ids, mask, 20, 1, generator=g_plain, top_k=10)
    rows = []
    model.model.register_forward_pre_hook(
        lambda _, args, kwargs: rows.append(kwargs["input_ids"].shape[0]), with_kwargs=True
    )
    cfg_one = generate_image_codes(
        BareLM(model),
        VOCAB,
        ids,
        mask,
        20,
        1,
        cfg_scale=1.0,
        uncond_input_ids=u_ids,
        uncond_attention_mask=u_mask,
        generator=g_cfg,
        top_k=10,
    )
    assert torch.equal(plain, cfg_one)
    assert torch.equal(g_plain.get_state(), g_cfg.get_state())
    assert set(rows) == {2}  # the unconditional prompt is not even run
    other = generate_image_codes(
        BareLM(model), VOCAB, ids, mask, 20, 1, generator=torch.Generator().manual_seed(12), top_k=10
    )
    assert not torch.equal(plain, other)  # the seed matters, so the equality above means something


def test_cfg_runs_cond_and_uncond_as_one_batch_and_guides():
    model = tiny_lm()
    prompts, uncond = random_prompts([5, 2, 6]), random_prompts([3], seed=4)[0]  # uncond shorter than some
    ids, mask = left_pad(prompts)
    u_ids, u_mask = left_pad([uncond])  # batch 1: shared by every row
    rows = []
    model.model.register_forward_pre_hook(
        lambda _, args, kwargs: rows.append(kwargs["input_ids"].shape[0]), with_kwargs=True
    )
    guided = generate_image_codes(
        BareLM(model),
        VOCAB,
        ids,
        mask,
        8,
        0,
        cfg_scale=3.0,
        uncond_input_ids=u_ids,
        uncond_attention_mask=u_mask,
        temperature=0,
    )
    assert rows == [6] * 8  # prefill + 7 fed tokens (the 8th is never fed back), all 2B rows
    unguided = generate_image_codes(BareLM(model), VOCAB, ids, mask, 8, 0, temperature=0)
    assert not torch.equal(guided, unguided)
    for row, prompt in enumerate(prompts):
        assert guided[row].tolist() == reference_codes(model, prompt, 8, 0, cfg_scale=3.0, uncond=uncond)

    g_guided, g_plain = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    generate_image_codes(
        BareLM(model),
        VOCAB,
        ids,
        mask,
        5,
        0,
        cfg_scale=2.0,
        uncond_input_ids=u_ids.expand(3, -1),
        uncond_attention_mask=u_mask.expand(3, -1),
        generator=g_guided,
    )
    generate_image_codes(BareLM(model), VOCAB, ids, mask, 5, 0, generator=g_plain)
    assert torch.equal(g_guided.get_state(), g_plain.get_state())  # guidance draws the same random numbers


def test_image_generation_rejects_bad_calls():
    model = tiny_lm()
    ids, mask = left_pad(random_prompts([2, 4]))
    with pytest.raises(ValueError, match="left-padded"):
        generate_image_codes(BareLM(model), VOCAB, ids, mask.flip(1), 4, 0)
    with pytest.raises(ValueError, match="unconditional prompt"):
        generate_image_codes(BareLM(model), VOCAB, ids, mask, 4, 0, cfg_scale=2.0)
    with pytest.raises(ValueError, match="scale_index"):
        generate_image_codes(BareLM(model), VOCAB, ids, mask, 4, 3)
    with pytest.raises(ValueError, match="num_tokens"):
        generate_image_codes(BareLM(model), VOCAB, ids, mask, 0, 0)
    with pytest.raises(ValueError, match="batch"):
        u_ids, u_mask = left_pad(random_prompts([2, 2, 2]))
        generate_image_codes(
            BareLM(model), VOCAB, ids, mask, 4, 0, cfg_scale=2.0, uncond_input_ids=u_ids, uncond_attention_mask=u_mask
        )


# --- generate_text -------------------------------------------------------------------------------------------


def test_text_generation_stops_each_row_at_its_first_eos():
    model = tiny_lm(seed=2)
    prompts = random_prompts([5, 2, 7], seed=3)
    ids, mask = left_pad(prompts)
    free = generate_text(BareLM(model), ids, mask, max_new_tokens=12, eos_token_ids=[])
    assert [len(r) for r in free] == [12, 12, 12]
    eos = free[0][3]
    stopped = generate_text(BareLM(model), ids, mask, max_new_tokens=12, eos_token_ids=[eos, 10_000])
    for free_row, row in zip(free, stopped, strict=True):
        end = free_row.index(eos) + 1 if eos in free_row else 12
        assert row == free_row[:end]
    assert stopped[0][-1] == eos and len(stopped[0]) <= 4
    for row, prompt in enumerate(prompts):  # left padding changes nothing
        assert generate_text(BareLM(model), *left_pad([prompt]), max_new_tokens=12, eos_token_ids=[]) == [free[row]]


def test_text_generation_never_emits_banned_ids():
    model = with_biased_head(tiny_lm(), IMAGES)  # the model wants image tokens
    ids, mask = left_pad(random_prompts([4, 6]))
    unbanned = generate_text(
        BareLM(model), ids, mask, 8, eos_token_ids=[0], temperature=1.0, generator=torch.Generator().manual_seed(0)
    )
    assert all(VOCAB.image_start <= t < VOCAB.image_end for row in unbanned for t in row)
    banned = generate_text(
        BareLM(model),
        ids,
        mask,
        8,
        eos_token_ids=[0],
        banned_token_ids=(VOCAB.image_start, VOCAB.image_end),
        temperature=1.0,
        generator=torch.Generator().manual_seed(0),
    )
    assert all(len(row) >= 1 for row in banned)
    assert not any(VOCAB.image_start <= t < VOCAB.image_end for row in banned for t in row)
    assert generate_text(BareLM(model), ids, mask, 0, eos_token_ids=[0]) == [[], []]
    with pytest.raises(ValueError, match="eos"):
        generate_text(BareLM(model), ids, mask, 4, eos_token_ids=[VOCAB.image_start], banned_token_ids=(100, 145))


@pytest.mark.parametrize("banned", [(100, 145), (20, 60), (0, 30)], ids=["at the end", "inside", "at the start"])
@pytest.mark.parametrize("with_bias", [False, True])
def test_text_logits_skip_the_banned_rows_and_equal_the_masked_full_head(banned, with_bias):
    torch.manual_seed(0)
    weight, hidden = torch.randn(145, 16), torch.randn(3, 16)
    bias = torch.randn(145) if with_bias else None
    plain = torch.nn.functional.linear(hidden, weight, bias)
    plain[:, banned[0] : banned[1]] = float("-inf")  # what the head computed before: every row, then the mask
    fast = generation._text_logits(hidden, weight, bias, banned)
    assert fast.dtype == torch.float32
    torch.testing.assert_close(fast, plain, rtol=1e-5, atol=1e-5)
    assert torch.equal(fast.isinf(), plain.isinf())


# --- any LanguageModel: the interface is all generation uses -------------------------------------------------


class GRULM(GenerationOnlyLM):
    """A language model that is no Hugging Face model at all: embedding -> GRU cell -> linear head."""

    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.model = nn.ModuleDict(
            {
                "embed": nn.Embedding(VOCAB.image_end, 16),
                "cell": nn.GRUCell(16, 16),
                "head": nn.Linear(16, VOCAB.image_end),
            }
        )

    @property
    def output_head(self) -> nn.Module:
        return self.model["head"]

    def incremental_decoder(self, attention_mask: torch.Tensor) -> "GRUDecoder":
        return GRUDecoder(self, attention_mask)

    def run(self, tokens: list[int]) -> torch.Tensor:
        """The hidden state after an unpadded sequence, recomputed from scratch."""
        h = torch.zeros(1, 16)
        for token in tokens:
            h = self.model["cell"](self.model["embed"](torch.tensor([token])), h)
        return h[0]


class GRUDecoder(IncrementalDecoder):
    def __init__(self, lm: GRULM, attention_mask: torch.Tensor):
        self.lm, self.mask, self.h = lm, attention_mask, None

    def prefill(self, input_ids: torch.Tensor) -> torch.Tensor:
        self.h = torch.zeros(len(input_ids), 16)
        for t in range(input_ids.shape[1]):  # padding leaves a row's state untouched
            new = self.step(input_ids[:, t], update=False)
            self.h = torch.where(self.mask[:, t, None] > 0, new, self.h)
        return self.h

    def step(self, token_ids: torch.Tensor, update: bool = True) -> torch.Tensor:
        new = self.lm.model["cell"](self.lm.model["embed"](token_ids), self.h)
        if update:
            self.h = new
        return new


def test_generation_drives_any_language_model_through_the_interface_alone():
    lm = GRULM().eval()
    prompts = random_prompts([3, 6])
    with torch.no_grad():
        codes = generate_image_codes(lm, VOCAB, *left_pad(prompts), num_tokens=5, scale_index=1, temperature=0)
        for row, prompt in enumerate(prompts):
            sequence = prompt + [VOCAB.im_start, VOCAB.scale_ids[1]]
            for code in codes[row].tolist():  # each code is the argmax of the image rows after what came before
                logits = lm.output_head(lm.run(sequence))[IMAGES]
                assert code == int(logits.argmax())
                sequence.append(VOCAB.image_start + code)
        answers = generate_text(lm, *left_pad(prompts), max_new_tokens=4, eos_token_ids=[])
    assert [len(a) for a in answers] == [4, 4]
