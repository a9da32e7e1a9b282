"""Under load: a few hundred mixed good and bad requests through both pipelines in one process. Bad ones fail
with a one-line error; none changes what the next good request gets; memory stays within a stated bound."""

import gc
import io
import os

import numpy as np
import pytest
import torch
from PIL import Image

from tarkit_plugins.lms import HFCausalLM
from tarkit_plugins.pipelines import ImageToTextPipeline, TextToImagePipeline
from tests.tiny_parts import tiny_tatok

REQUESTS = 300
WARMUP = 40  # requests before the memory baseline: allocator pools and caches fill first
RSS_GROWTH_BOUND = 64 * 2**20  # bytes the resident set may grow over the remaining requests


def resident_bytes() -> int:
    gc.collect()
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.fixture(scope="module")
def pipelines():
    torch.manual_seed(0)
    tatok = tiny_tatok()
    lm = HFCausalLM(preset="tiny", tokenizer="bytes", num_codes=32, num_scales=3)
    return ImageToTextPipeline(lm, tatok, scale=3), TextToImagePipeline(lm, tatok, scale=3, cfg_scale=2.0)


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_mixed_requests_leave_no_state_and_bounded_memory(pipelines, tmp_path):
    i2t, t2i = pipelines
    photo = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    (tmp_path / "photo.png").write_bytes(png_bytes(photo))
    (tmp_path / "truncated.png").write_bytes(png_bytes(photo)[:200])
    (tmp_path / "notes.txt").write_text("not an image")
    too_long = "x " * 5000  # beyond the tiny LM's context

    def answer(image=tmp_path / "photo.png", prompt="What is in the image?", **kwargs):
        return i2t.generate(image, prompt, max_new_tokens=kwargs.pop("max_new_tokens", 4), **kwargs)

    def draw(prompts=("a red circle",), seed=0):
        return t2i.generate_codes(list(prompts), generator=torch.Generator().manual_seed(seed)).tolist()

    good = {"answer": answer, "draw": draw, "answer 1x1": lambda: answer(photo.resize((1, 1))),
            "answer gray": lambda: answer(photo.convert("L"))}
    bad = {
        "truncated PNG": lambda: answer(tmp_path / "truncated.png"),
        "text file": lambda: answer(tmp_path / "notes.txt"),
        "missing file": lambda: answer(tmp_path / "nowhere.png"),
        "no image": lambda: answer(None),
        "number as prompt": lambda: answer(prompt=42),
        "over-long question": lambda: answer(prompt=too_long),
        "negative max_new_tokens": lambda: answer(max_new_tokens=-1),
        "float tensor out of range": lambda: answer(torch.full((3, 8, 8), 255.0)),
        "no prompts": lambda: draw(()),
        "None prompt": lambda: draw((None,)),
        "over-long prompt": lambda: draw((too_long,)),
    }
    expected = {name: request() for name, request in good.items()}
    names = [*good, *bad]
    errors, sizes = {}, []
    for number in range(REQUESTS):
        name = names[(number * 7) % len(names)]  # a fixed interleaving of every kind
        if name in good:
            assert good[name]() == expected[name], f"request {number} ({name}) after a bad one changed"
        else:
            with pytest.raises((ValueError, TypeError, OSError)) as caught:
                bad[name]()
            message = str(caught.value)
            assert message and "\n" not in message and "Traceback" not in message, (name, message)
            errors[name] = message
        if number == WARMUP:
            sizes.append(resident_bytes())
    sizes.append(resident_bytes())
    assert set(errors) == set(bad)  # every bad kind was met and refused
    for name, message in errors.items():
        print(f"soak: {name}: {message}")
    growth = sizes[-1] - sizes[0]
    print(f"soak: {REQUESTS} requests, resident set {sizes[0] / 2**20:.0f} -> {sizes[-1] / 2**20:.0f} MiB")
    assert growth < RSS_GROWTH_BOUND, f"resident set grew {growth / 2**20:.1f} MiB over {REQUESTS - WARMUP} requests"
