"""The pipelines take what users pass (paths, PIL, numpy, tensors, lists), default to what the LM folder records,
and load from one bundle folder; anything they refuse is refused in one line that says what to pass."""

import os
import shutil
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

import tarkit_plugins.pipelines as pipelines
from tarkit.prompts import image_ids, user_prefix
from tarkit_plugins.detok.ar import AutoregressiveDeTokenizer
from tarkit_plugins.image_inputs import IMAGE_INPUTS, images_to_batch
from tarkit_plugins.lm.settings import (
    TarSettings,
    TATokRecord,
    read_settings,
)
from tarkit_plugins.lms import HFCausalLM
from tarkit_plugins.pipelines import (
    EditPipeline,
    ImageToTextPipeline,
    TextToImagePipeline,
    UnseenScaleWarning,
    recorded_tatok,
)
from tarkit_plugins.tasks import ImageToImage, TextImageToImage
from tests.tiny_parts import tiny_tatok, write_bundle

SIZE = 48  # the tiny encoder's input side: no resizing, so every input kind must give the exact same pixels
# initializer_range 0.3: sharp enough that the prompt visibly changes the codes an untrained LM samples.


def picture(size: int = SIZE) -> np.ndarray:
    """A deterministic RGB uint8 image with every channel different."""
    return np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8)


def one_line(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert "\n" not in message
    return message


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    """A Tar bundle (:func:`tests.tiny_parts.write_bundle`): lm/ and tatok/ are siblings, so the record also finds
    the TA-Tok relative to lm/; pixel_vq/ is no de-tokenizer."""
    return write_bundle(tmp_path_factory.mktemp("bundle"))


@pytest.fixture(scope="module")
def i2t(bundle):
    return ImageToTextPipeline(bundle / "lm")


# --- every accepted image input ---------------------------------------------------------------------------------


def as_kind(kind: str, tmp_path):
    array = picture()
    if kind in ("str path", "Path"):
        Image.fromarray(array).save(tmp_path / "image.png")
        return str(tmp_path / "image.png") if kind == "str path" else tmp_path / "image.png"
    return {
        "PIL": lambda: Image.fromarray(array),
        "numpy HWC uint8": lambda: array,
        "numpy HWC float": lambda: array / 255.0,
        "float tensor CHW": lambda: torch.from_numpy(array).permute(2, 0, 1) / 255,
        "float tensor BCHW": lambda: (torch.from_numpy(array).permute(2, 0, 1) / 255)[None],
        "uint8 tensor": lambda: torch.from_numpy(array).permute(2, 0, 1),
        "list": lambda: [Image.fromarray(array)],
    }[kind]()


KINDS = ["str path", "Path", "PIL", "numpy HWC uint8", "numpy HWC float", "float tensor CHW", "float tensor BCHW",
         "uint8 tensor", "list"]


@pytest.mark.parametrize("kind", KINDS)
def test_every_accepted_image_input_gives_the_same_pixels(kind, tmp_path):
    expected = torch.from_numpy(picture()).permute(2, 0, 1)[None].float() / 255
    batch = images_to_batch(as_kind(kind, tmp_path), SIZE)
    assert batch.dtype == torch.float32 and batch.shape == (1, 3, SIZE, SIZE)
    torch.testing.assert_close(batch, expected, rtol=0, atol=1e-6)  # a uint8 tensor is not read as 0-255 floats


def test_grayscale_and_alpha_become_rgb():
    gray = np.arange(16 * 16, dtype=np.uint8).reshape(16, 16)
    batch = images_to_batch(gray, 16)
    assert batch.shape == (1, 3, 16, 16)
    assert torch.equal(batch[0, 0], torch.from_numpy(gray).float() / 255) and torch.equal(batch[0, 0], batch[0, 2])
    assert torch.equal(images_to_batch(torch.from_numpy(gray)[None], 16), batch)  # a [1, H, W] tensor too
    transparent = np.zeros((16, 16, 4), dtype=np.uint8)  # alpha 0: composited on white
    assert torch.equal(images_to_batch(transparent, 16), torch.ones(1, 3, 16, 16))


def test_a_list_of_mixed_kinds_and_sizes_becomes_one_batch(tmp_path):
    batch = images_to_batch([Image.fromarray(picture(32)), picture(64), torch.rand(2, 3, 20, 20)], SIZE)
    assert batch.shape == (4, 3, SIZE, SIZE) and 0 <= batch.min() and batch.max() <= 1


REJECTED = {
    "None": (None, TypeError, "cannot read a NoneType as an image"),
    "int": (3, TypeError, "cannot read a int as an image"),
    "dict": ({"image": 1}, TypeError, "cannot read a dict as an image"),
    "nested list": ([[picture()]], TypeError, "item 0 of the list: cannot read a list as an image"),
    "empty list": ([], ValueError, "got an empty list of images"),
    "0-255 float tensor": (torch.full((3, 8, 8), 200.0), ValueError, r"in \[0, 1\], got values in \[200, 200\]"),
    "normalised tensor": (torch.full((3, 8, 8), -0.5), ValueError, "undo any normalisation"),
    "NaN tensor": (torch.full((3, 8, 8), float("nan")), ValueError, r"must lie in \[0, 1\]"),
    "int64 tensor": (torch.zeros(3, 8, 8, dtype=torch.long), TypeError, "uint8 .0-255. or float in"),
    "RGBA tensor": (torch.rand(4, 8, 8), ValueError, r"\[C, H, W\] or \[B, C, H, W\] with C = 1 or 3, got \(4, 8, 8\)"),
    "HW tensor": (torch.rand(8, 8), ValueError, "with C = 1 or 3, got"),
    "bool array": (np.zeros((8, 8), dtype=bool), TypeError, "numpy images must be uint8"),
    "CHW array": (np.zeros((3, 8, 8), dtype=np.uint8), ValueError, r"H x W x C \(C = 1, 3 or 4\), got shape \(3, 8"),
}


@pytest.mark.parametrize("name", list(REJECTED))
def test_rejected_inputs_fail_in_one_line_saying_what_is_accepted(name):
    value, error, match = REJECTED[name]
    with pytest.raises(error, match=match) as info:
        images_to_batch(value, SIZE)
    message = one_line(info)
    if error is TypeError and "cannot read" in message:
        assert IMAGE_INPUTS in message


def test_a_missing_or_broken_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"image file {tmp_path / 'nope.png'} does not exist"):
        images_to_batch(str(tmp_path / "nope.png"), SIZE)
    (tmp_path / "broken.png").write_bytes(b"not a png")
    with pytest.raises(OSError, match=f"cannot read image {tmp_path / 'broken.png'}") as info:
        images_to_batch(tmp_path / "broken.png", SIZE)
    one_line(info)


def test_image_to_text_reads_a_path_like_a_tensor(i2t, tmp_path):
    path = as_kind("str path", tmp_path)
    from_path = i2t.generate(path, "Is there a red circle?", max_new_tokens=4)
    assert from_path == i2t.generate_batch(as_kind("uint8 tensor", tmp_path), ["Is there a red circle?"],
                                           max_new_tokens=4)[0]
    assert i2t.generate_batch([path, as_kind("PIL", tmp_path)], ["a?", "b?"], max_new_tokens=2)[0] == i2t.generate(
        path, "a?", max_new_tokens=2)
    with pytest.raises(ValueError, match="generate takes one image, got 2; use generate_batch"):
        i2t.generate([path, path], "a?")


# --- prompts ----------------------------------------------------------------------------------------------------


def test_prompts_must_be_strings(i2t, bundle):
    image = picture()
    with pytest.raises(TypeError, match="prompt must be a string, got NoneType") as info:
        i2t.generate(image, None)
    one_line(info)
    with pytest.raises(TypeError, match="prompts must be a list of strings, got one string"):
        i2t.generate_batch([image], "What is it?")
    with pytest.raises(TypeError, match=r"prompts\[1\] must be a string, got int"):
        i2t.generate_batch([image, image], ["ok", 3])
    t2i = TextToImagePipeline(bundle / "lm")
    with pytest.raises(ValueError, match="prompts is empty"):
        t2i.generate_codes([])
    with pytest.raises(TypeError, match="prompt must be a string"):
        t2i.generate_image(None)


def test_an_empty_question_asks_for_a_caption(i2t, monkeypatch):
    questions = []
    real = pipelines.user_prefix

    def spy(tokenizer, parts):
        questions.append(parts[-1])
        return real(tokenizer, parts)

    monkeypatch.setattr(pipelines, "user_prefix", spy)
    i2t.generate_batch([picture()] * 3, ["", "  ", "How many?"], max_new_tokens=1)
    assert questions == ["\nDescribe the image.", "\nDescribe the image.", "\nHow many?"]


def test_an_empty_prompt_is_the_unconditional_sample(bundle):
    """Guidance contrasts a prompt with the empty one, so for "" it changes nothing (greedy codes compared)."""
    unguided = TextToImagePipeline(bundle / "lm", cfg_scale=1.0, temperature=0)
    guided = TextToImagePipeline(unguided.lm, unguided.tatok, cfg_scale=5.0, temperature=0)
    assert torch.equal(guided.generate_codes([""]), unguided.generate_codes([""]))
    assert not torch.equal(guided.generate_codes(["a red circle"]), unguided.generate_codes(["a red circle"]))


# --- defaults from the LM folder --------------------------------------------------------------------------------


def test_defaults_come_from_the_lm_folder_record(bundle):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the recorded scale is a trained one: no warning
        t2i = TextToImagePipeline(bundle / "lm")  # no tatok: the record names it
    assert t2i.scale == 2 and (t2i.cfg_scale, t2i.temperature, t2i.top_k, t2i.top_p) == (3.0, 0.5, 7, 0.9)
    assert t2i.tatok.num_codes == 32 and t2i.generate_codes(["a red circle"]).shape == (1, 36)
    i2t = ImageToTextPipeline(str(bundle / "lm"))
    assert i2t.scale == 2


def test_arguments_override_the_record(bundle):
    t2i = TextToImagePipeline(
        bundle / "lm", bundle / "tatok", scale=2, cfg_scale=1.5, temperature=1.0, top_k=0, top_p=1.0
    )
    assert (t2i.scale, t2i.cfg_scale, t2i.temperature, t2i.top_k, t2i.top_p) == (2, 1.5, 1.0, None, 1.0)


def test_without_a_record_the_reference_defaults_hold_and_tatok_is_needed(bundle):
    t2i = TextToImagePipeline(bundle / "plain_lm", bundle / "tatok")
    assert (t2i.scale, t2i.cfg_scale, t2i.temperature, t2i.top_k, t2i.top_p) == (1, 1.0, 1.0, 1200, 0.95)
    with pytest.raises(ValueError, match="no tatok given and the LM records no TA-Tok; pass tatok=") as info:
        ImageToTextPipeline(bundle / "plain_lm")
    one_line(info)


def test_a_loaded_lm_carries_its_record(bundle):
    lm = HFCausalLM.from_pretrained(bundle / "lm")  # transformers reads generation_config.json into the model
    assert ImageToTextPipeline(lm).scale == 2


def test_a_scale_never_trained_on_warns_at_the_callers_line(bundle):
    with pytest.warns(UnseenScaleWarning, match=r"scale 1 was never used in training this LM \(train_scales \[2\]\)"):
        i2t = ImageToTextPipeline(bundle / "lm", scale=1)
    assert i2t.scale == 1
    with pytest.warns(UnseenScaleWarning) as caught:
        TextToImagePipeline(bundle / "lm", scale=3)
    assert caught[0].filename == __file__


def test_a_tatok_with_other_pool_scales_is_refused(bundle):
    torch.manual_seed(0)
    other = tiny_tatok(pool_scales=[1, 2])
    with pytest.raises(ValueError, match=r"pool scales \[1, 2, 3\].*but this one has \[1, 2\]"):
        ImageToTextPipeline(bundle / "lm", other)


def test_the_recorded_tatok_is_found_beside_a_moved_lm(bundle, tmp_path):
    moved = tmp_path / "moved"
    shutil.copytree(bundle / "lm", moved / "lm")
    shutil.copytree(bundle / "tatok", moved / "tatok")
    settings = read_settings(moved / "lm")
    assert recorded_tatok(settings, moved / "lm") == moved / "lm" / "../tatok"  # before the path as given
    gone = TarSettings(tatok=TATokRecord(path=str(tmp_path / "gone"), path_from_lm="../tatok"))
    assert recorded_tatok(gone, moved / "lm") == moved / "lm" / "../tatok"
    assert recorded_tatok(gone, None) is None
    assert os.path.samefile(recorded_tatok(settings, bundle / "lm"), bundle / "tatok")


# --- bundles ----------------------------------------------------------------------------------------------------


def test_a_bundle_loads_with_one_path(bundle):
    t2i = TextToImagePipeline.from_pretrained(bundle)
    assert t2i.scale == 2 and t2i.autoencoder is not None
    assert isinstance(t2i.autoencoder.detokenizer, AutoregressiveDeTokenizer)  # not pixel_vq/, which is no de-tokenizer
    image = t2i.generate_image("a red circle", generator=torch.Generator().manual_seed(0))
    assert image.size == (16, 16) and image.mode == "RGB"
    assert ImageToTextPipeline.from_pretrained(str(bundle)).generate(picture(), "What?", max_new_tokens=2) is not None


def test_bundle_keywords_override(bundle):
    with pytest.warns(UnseenScaleWarning):
        t2i = TextToImagePipeline.from_pretrained(bundle, scale=3, detokenizer=None, cfg_scale=2.0)
    assert (t2i.scale, t2i.cfg_scale, t2i.autoencoder) == (3, 2.0, None)
    assert ImageToTextPipeline.from_pretrained(bundle, lm=bundle / "plain_lm").scale == 1


def test_a_bundle_without_tatok_uses_the_one_the_lm_records(bundle, tmp_path):
    shutil.copytree(bundle / "lm", tmp_path / "lm")  # ../tatok is not there: the path as given is
    i2t = ImageToTextPipeline.from_pretrained(tmp_path)
    assert i2t.scale == 2 and i2t.tatok.num_codes == 32


def test_missing_bundle_parts_say_which_and_how_to_make_them(bundle, tmp_path):
    with pytest.raises(FileNotFoundError, match=f"no lm/ in {tmp_path}; train it with recipes/tiny/lm.yaml") as info:
        ImageToTextPipeline.from_pretrained(tmp_path)
    one_line(info)
    shutil.copytree(bundle / "plain_lm", tmp_path / "lm")
    with pytest.raises(FileNotFoundError, match="no tatok/ in .*; train it with recipes/tiny/tatok.yaml"):
        ImageToTextPipeline.from_pretrained(tmp_path)
    shutil.copytree(bundle / "tatok", tmp_path / "tatok")
    with pytest.raises(FileNotFoundError, match="no de-tokenizer in .*recipes/tiny/ar_detok.yaml") as info:
        TextToImagePipeline.from_pretrained(tmp_path)
    one_line(info)
    for name in ("ar_one", "ar_two"):
        shutil.copytree(bundle / "ar_detok", tmp_path / name)
    with pytest.raises(ValueError, match=r"several de-tokenizers \(ar_one/, ar_two/\); choose one with detokenizer="):
        TextToImagePipeline.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        TextToImagePipeline.from_pretrained(tmp_path / "nowhere")


def test_images_without_a_detokenizer_fail_before_sampling(bundle, monkeypatch):
    t2i = TextToImagePipeline(bundle / "lm")
    monkeypatch.setattr(t2i, "generate_codes", lambda *a, **k: pytest.fail("sampled codes it could not draw"))
    with pytest.raises(ValueError, match="has no de-tokenizer; pass detokenizer=") as info:
        t2i.generate_image("a red circle")
    one_line(info)


# --- editing ----------------------------------------------------------------------------------------------------


def test_an_edit_is_sampled_after_the_image_and_instruction_and_guided_by_the_redraw(bundle, monkeypatch):
    edit = EditPipeline.from_pretrained(bundle, scale=3)
    drawn_size = edit.generate_image("a red circle").size
    seen = {}
    real = edit.codes_for_prompts

    def spy(prompts, uncond, generator=None):
        seen["prompts"], seen["uncond"] = prompts, uncond
        return real(prompts, uncond, generator)

    monkeypatch.setattr(edit, "codes_for_prompts", spy)
    image = edit.edit(picture(), "make it red", generator=torch.Generator().manual_seed(0))
    assert isinstance(image, Image.Image) and image.size == drawn_size
    codes = edit.tatok.tokenize(edit.pixels(picture()), 3)[0]
    user = [image_ids(edit.vocab, codes), "\n" + "make it red"]
    sample = {"text": "make it red", "input_codes": codes}
    assert seen["prompts"] == [TextImageToImage().prompt(sample, edit.tokenizer, edit.vocab)]  # as trained
    assert seen["prompts"] == [user_prefix(edit.tokenizer, user)]
    assert seen["uncond"] == [ImageToImage().prompt({"input_codes": codes}, edit.tokenizer, edit.vocab)]


def test_edits_are_batched_seeded_and_checked(bundle):
    edit = EditPipeline.from_pretrained(bundle, scale=3)
    pair = ([picture(), picture()], ["make it red", ""])  # an empty instruction redraws
    first, again = (edit.edit_codes(*pair, generator=torch.Generator().manual_seed(1)) for _ in range(2))
    assert first.shape == (2, 16) and torch.equal(first, again)
    assert len(edit.edit_images(*pair)) == 2
    for args, message in (
        (([picture()], ["a", "b"]), "got 1 images but 2 instructions"),
        (([picture()], "make it red"), "prompts must be a list of strings, got one string"),
        (([picture()], [None]), "prompts\\[0\\] must be a string"),
    ):
        with pytest.raises((TypeError, ValueError), match=message) as info:
            edit.edit_codes(*args)
        one_line(info)
    with pytest.raises(ValueError, match="edit takes one image, got 2"):
        edit.edit([picture(), picture()], "make it red")


def test_reflected_edits_keep_the_candidate_the_instruction_explains_best(bundle, monkeypatch):
    from tarkit_plugins import pipelines

    edit = EditPipeline.from_pretrained(bundle, scale=3, candidates=3)
    with_text = torch.tensor([0.0, 5.0, 1.0, 2.0, 0.0, 9.0])
    without = torch.tensor([0.0, 1.0, 0.0, 0.0, 0.0, 9.0])  # gains 0 4 1 | 2 0 0: candidates 1 and 3 win
    calls = iter([with_text, without])
    monkeypatch.setattr(pipelines, "image_log_likelihood", lambda *a: next(calls))
    drawn = torch.arange(6)[:, None].expand(6, 16)
    monkeypatch.setattr(edit, "codes_for_prompts", lambda prompts, uncond, generator=None: drawn[: len(prompts)])
    assert edit.edit_codes([picture(), picture()], ["a", "b"])[:, 0].tolist() == [1, 3]


def test_image_log_likelihood_prefers_the_lms_own_greedy_image(bundle):
    from tarkit_plugins.lm.reflect import image_log_likelihood

    edit = EditPipeline.from_pretrained(bundle, scale=3, temperature=0.0, cfg_scale=1.0)
    users = edit.users(edit.tatok.tokenize(edit.pixels(picture()), 3), ["make it red"])[0]
    greedy = edit.edit_codes([picture()], ["make it red"])
    other = (greedy + 1) % 32
    scores = image_log_likelihood(edit.lm, edit.vocab, users * 2, torch.cat([greedy, other]), 2)
    assert scores.shape == (2,) and scores[0] > scores[1] and (scores < 0).all()
