"""Bad input through every public entry point: each case is a one-line error naming the problem and the fix (the
CLI: exit status 2 and one ``tarkit: error:`` line), or a documented repair; never a traceback from deep inside
torch or PIL. Cases already covered elsewhere are not repeated here: image modes and unreadable files in the
image-text datamodule (tests/plugins/datamodules), missing keys and wrong shapes (test_pretrained,
tests/plugins/tatok/test_official), a folder naming a class that is not installed (test_saved_folders), an unknown
codebook in a recipe (test_cli), non-image objects passed to the pipelines (tests/plugins/test_pipelines)."""

import io
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tarkit.cli import main
from tarkit.data import DataFormatError
from tarkit.pretrained import PretrainedLoadError
from tarkit.tatok import TATok, load_tatok
from tarkit_plugins.datamodules.prompts import PromptsDataModule
from tarkit_plugins.detok.ar import AutoregressiveDeTokenizer, load_official_ar_detokenizer
from tarkit_plugins.detok.pixel_vq import PixelVQ
from tarkit_plugins.image_inputs import images_to_batch
from tarkit_plugins.lms import HFCausalLM
from tarkit_plugins.pipelines import ImageToTextPipeline, TextToImagePipeline
from tests.tiny_parts import MICRO_GPT, MICRO_VQ, SMALL_LM, tiny_tatok

OLD = Path(__file__).parent / "fixtures" / "folders_v0_1"
SIZE = 48  # the tiny encoder's input side


def one_line(info: pytest.ExceptionInfo) -> str:
    message = str(info.value)
    assert "\n" not in message and message
    return message


# --- image files: the pipelines' image inputs and the prediction datamodule ----------------------------------------


def png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width x height`` pixels and whose data is a few bytes."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    )


def png(size=(8, 8)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (200, 30, 30)).save(buffer, format="PNG")
    return buffer.getvalue()


BAD_IMAGE_FILES = {
    "corrupt": (lambda: np.random.default_rng(0).integers(0, 256, 512, dtype=np.uint8).tobytes(), "cannot identify"),
    "truncated": (lambda: png((64, 64))[:120], "truncated"),
    "not an image": (lambda: b"a caption, not a picture\n", "cannot identify"),
    "decompression bomb": (lambda: png_claiming(100_000, 100_000), "DecompressionBombError"),
}


@pytest.mark.parametrize("case", list(BAD_IMAGE_FILES))
def test_a_bad_image_file_is_one_line_naming_it_and_the_fix(tmp_path, case):
    make, reason = BAD_IMAGE_FILES[case]
    (tmp_path / "bad.png").write_bytes(make())
    with pytest.raises(OSError, match=reason) as info:
        images_to_batch(tmp_path / "bad.png", SIZE)
    assert one_line(info).startswith(f"cannot read image {tmp_path / 'bad.png'}: ")
    assert "pass an intact image file" in str(info.value)
    with pytest.raises(DataFormatError, match=reason) as info:
        PromptsDataModule(str(tmp_path), image_size=SIZE).dataset[0]
    assert one_line(info).startswith(f"{tmp_path}: cannot read image bad.png: ") and "replace or remove it" in str(
        info.value
    )


ODD_IMAGES = {  # mode -> (how it is saved, the colour it must read as)
    "grayscale L": (lambda: Image.new("L", (8, 8), 128), "png", (128, 128, 128)),
    "RGBA": (lambda: Image.new("RGBA", (8, 8), (255, 0, 0, 0)), "png", (255, 255, 255)),  # on white
    "palette P": (lambda: Image.new("P", (8, 8), 0), "png", (0, 0, 0)),
    "16-bit I;16": (lambda: Image.fromarray(np.full((8, 8), 65535, dtype=np.uint16)), "png", (255, 255, 255)),
    "CMYK": (lambda: Image.new("CMYK", (8, 8), (0, 0, 0, 0)), "jpg", (255, 255, 255)),
    "1x1": (lambda: Image.new("RGB", (1, 1), (0, 0, 255)), "png", (0, 0, 255)),
}


@pytest.mark.parametrize("mode", list(ODD_IMAGES))
def test_every_image_mode_and_tiny_size_reads_as_rgb(tmp_path, mode):
    make, suffix, colour = ODD_IMAGES[mode]
    make().save(tmp_path / f"a.{suffix}")
    batch = images_to_batch(tmp_path / f"a.{suffix}", SIZE)
    assert batch.shape[:2] == (1, 3) and batch.dtype == torch.float32
    assert [round(v) for v in (batch.mean(dim=(0, 2, 3)) * 255).tolist()] == pytest.approx(colour, abs=2)
    row = PromptsDataModule(str(tmp_path), image_size=SIZE).dataset[0]["image"]
    assert row.shape == (3, SIZE, SIZE)


def test_an_8000_pixel_image_is_shrunk_in_pil_before_it_becomes_floats(tmp_path):
    Image.new("RGB", (8000, 8000), (10, 200, 30)).save(tmp_path / "big.png", compress_level=1)
    batch = images_to_batch(tmp_path / "big.png", SIZE)
    assert batch.shape[2:] == (97, 97)  # reduced by 82 to no less than twice the encoder's side, not 8000 x 8000
    assert [round(v) for v in (batch[0, :, 0, 0] * 255).tolist()] == [10, 200, 30]


def test_non_utf8_prompt_file_names_its_line(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_bytes(b'{"task": "t2i", "text": "a cat"}\n{"task": "t2i", "text": "a caf\xe9"}\n')
    with pytest.raises(DataFormatError, match=r"prompts\.jsonl:2: not UTF-8 .*save the file as UTF-8") as info:
        PromptsDataModule(str(path))
    one_line(info)


# --- pipelines: prompts longer than the LM's context, token streams and codes ------------------------------------


@pytest.fixture(scope="module")
def parts():
    """A tiny TA-Tok (12x12 grid: 144 / 36 / 16 codes at scales 1 / 2 / 3), an LM of 128 positions, an AR
    de-tokenizer."""
    torch.manual_seed(0)
    tatok = tiny_tatok()
    lm = HFCausalLM(preset="tiny", tokenizer="bytes", num_codes=32, num_scales=3,
                    config={**SMALL_LM, "max_position_embeddings": 128, "initializer_range": 0.02})
    vq = PixelVQ(preset=None, config=MICRO_VQ)
    detok = AutoregressiveDeTokenizer(vq, condition_dim=96, preset="tiny", config=MICRO_GPT)
    return ImageToTextPipeline(lm, tatok, scale=3), TextToImagePipeline(lm, tatok, detok, scale=3)


def test_a_prompt_beyond_the_lms_context_is_refused_not_truncated(parts):
    i2t, t2i = parts
    with pytest.raises(
        ValueError,
        match=r"the prompt is \d+ tokens and max_new_tokens asks for 4 more, beyond the "
        r"LM's context of 128 tokens \(max_position_embeddings\); shorten the prompt or lower",
    ) as info:
        i2t.generate(np.zeros((SIZE, SIZE, 3), np.uint8), "word " * 40, max_new_tokens=4)
    one_line(info)
    with pytest.raises(ValueError, match="max_new_tokens asks for 500 more"):
        i2t.generate(np.zeros((SIZE, SIZE, 3), np.uint8), "hi", max_new_tokens=500)
    with pytest.raises(
        ValueError, match=r"the image takes 18 more, .*; shorten the prompt or use a larger scale"
    ) as info:
        t2i.generate_codes(["word " * 40])
    one_line(info)
    assert t2i.generate_codes(["a red circle"]).shape == (1, 16)  # a prompt that fits still draws


def stream(t2i, codes, scale_index=2, text_inside=None, close=True):
    vocab = t2i.vocab
    ids = [5, 6, vocab.im_start, vocab.scale_ids[scale_index], *(c + vocab.image_start for c in codes)]
    if text_inside is not None:
        ids.insert(6, text_inside)
    return ids + ([vocab.im_end, 7] if close else [])


def test_a_token_stream_generated_without_constraints_is_parsed_or_refused_in_one_line(parts):
    _, t2i = parts
    good = list(range(16))
    assert t2i.codes_from_token_ids(stream(t2i, good)).tolist() == [good]
    assert t2i.codes_from_token_ids(torch.tensor(stream(t2i, good, close=False))).tolist() == [good]  # cut at the end
    fix = "sample with generate_codes"
    cases = [
        ([5, 6, 7], "the token stream has no <im_start>, so it holds no image"),
        ([5, t2i.vocab.im_start, 7], r"<im_start> is not followed by a scale token <S0>..<S2>"),
        (stream(t2i, good[:9]), "the image span holds 9 image tokens but scale 3 takes 16"),
        (stream(t2i, good, text_inside=ord("a")), "token 97 at position 2 of the image span is not an image token"),
        (stream(t2i, good[:15] + [40]), r"token \d+ at position 15 of the image span is not an image token"),  # >= K
    ]
    for ids, message in cases:
        with pytest.raises(ValueError, match=message) as info:
            t2i.codes_from_token_ids(ids)
        assert fix in one_line(info)


@pytest.mark.parametrize(
    ("codes", "message"),
    [
        (
            torch.zeros(1, 15, dtype=torch.long),
            r"got 15 codes per image, but this TA-Tok's scales \[1, 2, 3\] take "
            "144, 36, 16; pass all of one image's codes per row",
        ),
        (torch.zeros(1, 64, dtype=torch.long), "got 64 codes per image"),  # square, but no scale's count
        (torch.full((1, 16), 32), r"codes must lie in \[0, 32\) .*got \[32, 32\]; decode codes made by this TA-Tok"),
        (torch.full((1, 16), -1), r"got \[-1, -1\]"),
        (torch.zeros(1, 16), r"expected code indices \[B, n\] as an integer torch tensor, got \(1, 16\)"),
        ([[0] * 16], "got list"),
    ],
    ids=["too few", "no scale's count", "out of range", "negative", "float", "list"],
)
def test_malformed_codes_are_refused_before_decoding(parts, codes, message):
    _, t2i = parts
    with pytest.raises(ValueError, match=message) as info:
        t2i.decode(codes)
    one_line(info)


# --- saved folders and checkpoint files ----------------------------------------------------------------------------


def damaged(tmp_path, name, edit):
    folder = shutil.copytree(OLD / "tatok", tmp_path / name)
    edit(folder)
    return folder


FOLDER_CASES = {
    "truncated safetensors": (
        lambda f: (f / "model.safetensors").write_bytes((f / "model.safetensors").read_bytes()[:4000]),
        r"model\.safetensors is not a readable safetensors file \(.*\); it is damaged or truncated: save or download",
    ),
    "a .pth as model.safetensors": (
        lambda f: torch.save({"w": torch.zeros(2)}, f / "model.safetensors"),
        r"model\.safetensors is not a readable safetensors file",
    ),
    "latin-1 config.json": (
        lambda f: (f / "config.json").write_bytes(
            (f / "config.json").read_bytes().replace(b'"init_args"', b'"init\xe9"')
        ),
        r"config\.json is not valid UTF-8 JSON \(.*invalid continuation byte\); save the folder again",
    ),
    "typo'd argument in config.json": (
        lambda f: (f / "config.json").write_text(
            (f / "config.json").read_text().replace("decoder_depth", "decoder_dept")
        ),
        r"config\.json does not build its model \(.*unexpected keyword argument 'decoder_dept'\); fix init_args",
    ),
}


@pytest.mark.parametrize("case", list(FOLDER_CASES))
def test_a_damaged_saved_folder_is_one_line_naming_the_file(tmp_path, case):
    edit, message = FOLDER_CASES[case]
    folder = damaged(tmp_path, "tatok", edit)
    with pytest.raises(PretrainedLoadError, match=message) as info:
        TATok.from_pretrained(folder)
    assert one_line(info).startswith(str(folder))


REFERENCE_FILES = {  # what a ta_tok.pth / ar_dtok_*.pth may be instead of a checkpoint
    "truncated": (lambda p: torch.save({"model": {"args": {}, "sd": {"w": torch.zeros(64)}}}, p), True),
    "an image renamed .pth": (lambda p: p.write_bytes(png()), False),
    "a text file": (lambda p: p.write_text("model weights\n"), False),
}


@pytest.mark.parametrize("case", list(REFERENCE_FILES))
def test_a_damaged_reference_file_is_one_line_for_both_official_loaders(tmp_path, case):
    make, truncate = REFERENCE_FILES[case]
    path = tmp_path / "ta_tok.pth"
    make(path)
    if truncate:
        path.write_bytes(path.read_bytes()[:200])
    message = (
        "cannot be read as a weights-only torch checkpoint: damaged, truncated or another format .*download or save"
    )
    with pytest.raises(PretrainedLoadError, match=message) as info:
        load_tatok(path)
    assert one_line(info).startswith(str(path))
    with pytest.raises(PretrainedLoadError, match=message):
        load_official_ar_detokenizer(str(path), vq=str(OLD / "ar_detok"))


# --- the CLI: recipes --------------------------------------------------------------------------------------------

RECIPE = """\
model:
  class_path: example_regressor
  init_args:
    codebook:
      class_path: learned
      init_args: {num_codes: 4, dim: 8}
data:
  class_path: example_random
trainer:
  accelerator: cpu
  logger: false
  enable_checkpointing: false
  enable_progress_bar: false
  enable_model_summary: false
"""

RECIPE_CASES = {
    "typo'd nested key": (
        lambda r: r.replace("num_codes: 4", "num_cods: 4"),
        "model.init_args.codebook: Option 'num_cods' is not accepted; fix the recipe (`tarkit fit --help` lists keys)",
    ),
    "wrong type": (
        lambda r: r.replace("num_codes: 4", "num_codes: four"),
        "model.init_args.codebook.init_args.num_codes: Expected a <class 'int'>. Got value: four; fix the recipe",
    ),
    "typo'd trainer key": (
        lambda r: r.replace("accelerator:", "acelerator:"),
        "Subcommand 'fit' does not accept option 'trainer.acelerator'; fix the recipe",
    ),
    "unknown datamodule": (
        lambda r: r.replace("example_random", "no_such_data"),
        "unknown part 'no_such_data' for tarkit.datamodules (available: ",
    ),
    "YAML syntax error": (lambda r: "model: [unclosed\n", "Problems parsing config: while parsing a flow sequence"),
    "latin-1 text": (
        lambda r: r.encode("utf-8") + "# caf\xe9\n".encode("latin-1"),
        "is not UTF-8 (invalid continuation byte at byte 305); save the recipe as UTF-8",
    ),
}


def cli_error(capsys, args: list[str]) -> str:
    """The one stderr line of a CLI call that must exit with status 2."""
    with pytest.raises(SystemExit) as info:
        main(args)
    assert info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "Traceback" not in err and err.startswith("tarkit: error: "), err
    return err


@pytest.mark.parametrize("case", list(RECIPE_CASES))
def test_a_bad_recipe_is_one_line_with_status_2(tmp_path, capsys, case):
    edit, message = RECIPE_CASES[case]
    recipe = tmp_path / "recipe.yaml"
    text = edit(RECIPE)
    recipe.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8"))
    assert message in cli_error(capsys, ["fit", "--config", str(recipe), "--trainer.fast_dev_run=1"])


def test_a_missing_recipe_or_a_bad_option_is_one_line(tmp_path, capsys):
    missing = tmp_path / "gone.yaml"
    assert f"config: File does not exist: '{missing}'; fix the recipe" in cli_error(
        capsys, ["fit", "--config", str(missing)]
    )
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(RECIPE)
    err = cli_error(capsys, ["fit", "--config", str(recipe), "--trainer.max_steps=abc"])
    assert "trainer.max_steps: Expected a <class 'int'>. Got value: abc" in err


def test_a_missing_checkpoint_file_is_one_line(tmp_path, capsys):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(RECIPE)
    err = cli_error(capsys, ["fit", "--config", str(recipe), "--ckpt_path", str(tmp_path / "gone.ckpt")])
    assert err == f"tarkit: error: {tmp_path / 'gone.ckpt'}: no such checkpoint file"


def test_the_context_check_leaves_a_prompt_that_fits_alone(parts):
    i2t, _ = parts
    assert isinstance(i2t.generate(np.zeros((SIZE, SIZE, 3), np.uint8), "what?", max_new_tokens=2), str)
