"""`tarkit app`'s handlers, called directly on a tiny untrained bundle: bad input is a one-line message for the
page, empty prompts do what the pipelines define (with a warning), every request brings its own settings and
shares the loaded weights; the command's own errors are one line. The page itself: test_app_browser.py."""

import sys
import warnings
from dataclasses import asdict

import gradio as gr
import numpy as np
import pytest
import torch
from PIL import Image

import tarkit_plugins.detok.autoencoder as autoencoder
import tarkit_plugins.pipelines as pipelines
from tarkit.cli import main
from tarkit_plugins.app import MISSING_GRADIO
from tarkit_plugins.app_ui import NO_ANSWER, NO_IMAGE, Handlers, Models, Sampling, for_page
from tests.tiny_parts import write_bundle


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A tiny untrained bundle (lm/ recording train_scales [2] and generation defaults, tatok/, ar_detok/), loaded."""
    root = write_bundle(tmp_path_factory.mktemp("app_bundle"))
    return Models.load(root / "lm", root / "tatok", root / "ar_detok")


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "scene.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (48, 48, 3), dtype=np.uint8)).save(path)
    return str(path)


def settings(models, **changes):
    """The page's inputs for an image tab (scale, cfg, temperature, top-k, top-p, candidates, seed)."""
    values = {**asdict(models.defaults), "seed": 0, **changes}
    return [values[k] for k in ("scale", "cfg_scale", "temperature", "top_k", "top_p", "candidates", "seed")]


def message(err: pytest.ExceptionInfo) -> str:
    assert "\n" not in err.value.message
    return err.value.message


def test_no_image_is_a_message_for_the_page(models):
    handlers = Handlers(models)
    with pytest.raises(gr.Error) as err:
        handlers.answer(None, "Is there a red circle?")
    assert message(err) == NO_IMAGE
    with pytest.raises(gr.Error) as err:
        handlers.edit(None, "make it blue", *settings(models))
    assert message(err) == NO_IMAGE
    with pytest.raises(gr.Error) as err:  # what the page sends once the upload's file is gone
        handlers.answer({"path": None, "url": None}, "Is there a red circle?")
    assert "upload it again" in message(err)


def test_an_unreadable_file_gets_the_pipelines_one_line_message(models, tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    with pytest.raises(gr.Error) as err:
        Handlers(models).answer({"path": str(broken), "orig_name": "broken.png"}, "Is there a red circle?")
    assert message(err).startswith(f"cannot read image {broken}: ") and "pass an intact image file" in message(err)


def test_empty_prompts_do_what_the_pipelines_define_and_say_so(models, image, capsys):
    handlers = Handlers(models)
    with pytest.warns(UserWarning, match="unconditional sample"):
        blank = handlers.generate("   ", *settings(models))
    unconditional = models.t2i.generate_image("", torch.Generator().manual_seed(0))
    assert np.array_equal(np.asarray(blank), np.asarray(unconditional))
    with pytest.warns(UserWarning, match="redraws the image"):
        assert isinstance(handlers.edit(image, "", *settings(models)), Image.Image)
    assert handlers.answer(image, "") == (models.i2t.generate(image, "") or NO_ANSWER)  # "Describe the image."
    assert "no question: describing the image" in capsys.readouterr().out


def test_each_request_brings_its_settings_and_shares_the_loaded_weights(models, image, monkeypatch):
    def no_loading(*args, **kwargs):
        raise AssertionError("a request loaded weights")

    monkeypatch.setattr(pipelines, "load_lm", no_loading)
    monkeypatch.setattr(pipelines, "load_tatok", no_loading)
    monkeypatch.setattr(autoencoder, "load_detokenizer", no_loading)
    sampling = Sampling(scale=3, cfg_scale=5.0, temperature=0.7, top_k=0, top_p=1.0, candidates=2)
    with pytest.warns(pipelines.UnseenScaleWarning):  # the constructor's checks hold for every request's settings
        edit = models.pipeline(pipelines.EditPipeline, sampling)
    assert (edit.scale, edit.cfg_scale, edit.temperature, edit.top_k, edit.top_p, edit.candidates) == (
        3, 5.0, 0.7, None, 1.0, 2)
    assert edit.lm is models.t2i.lm and edit.tatok is models.t2i.tatok
    assert edit.autoencoder.detokenizer is models.t2i.autoencoder.detokenizer
    t2i = models.t2i  # the loaded pipeline keeps the recorded settings
    assert (t2i.scale, t2i.cfg_scale, t2i.temperature, t2i.top_k, t2i.top_p, t2i.candidates) == (2, 3.0, 0.5, 7, 0.9, 1)
    handlers = Handlers(models)
    first = handlers.generate("a red circle", *settings(models, candidates=2, seed=3))
    again = handlers.generate("a red circle", *settings(models, candidates=2, seed=3))
    expected = models.pipeline(pipelines.TextToImagePipeline, Sampling(**{**asdict(models.defaults), "candidates": 2}))
    assert np.array_equal(np.asarray(first), np.asarray(again))
    assert np.array_equal(
        np.asarray(first), np.asarray(expected.generate_image("a red circle", torch.Generator().manual_seed(3))))
    with pytest.warns(UserWarning, match="scale 3 was never used"):
        edited = handlers.edit(image, "make it blue", *settings(models, scale=3, seed=1))
    assert edited.size == first.size and isinstance(handlers.answer(image, "Is there a red circle?"), str)


def test_refused_settings_are_one_line_messages(models):
    handlers = Handlers(models)
    with pytest.raises(gr.Error) as err:
        handlers.generate("a red circle", *settings(models, candidates=0))
    assert message(err) == "candidates must be >= 1, got 0"
    with pytest.raises(gr.Error) as err:
        handlers.generate("a red circle", *settings(models, scale=7))
    assert message(err) == "pool scale 7 is not one of this tokenizer's scales [1, 2, 3]"
    with pytest.raises(gr.Error) as err:
        handlers.generate("a red circle", *settings(models, seed="abc"))
    assert message(err) == "seed must be a whole number, got 'abc'"
    with pytest.raises(gr.Error) as err:
        handlers.generate("a red circle", *settings(models, cfg_scale=None))
    assert message(err) == "cfg_scale must be a number, got None"


def test_a_scale_the_lm_never_saw_is_a_warning_in_the_page(models):
    with pytest.warns(UserWarning, match=r"scale 1 was never used in training this LM \(train_scales \[2\]\)"):
        assert isinstance(Handlers(models).generate("a red circle", *settings(models, scale=1)), Image.Image)


def test_messages_with_tags_are_escaped_for_the_page_only_then():
    assert for_page("candidates must be >= 1, got 0") == "candidates must be >= 1, got 0"
    assert for_page("no <im_start> & more") == "no &lt;im_start&gt; &amp; more"


def test_without_the_demos_checkpoints_the_command_says_make_demo(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["app"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["tarkit app: error: no checkpoints in outputs/demo/checkpoints (the folder does not exist); "
                   "`make demo` makes them, or pass --bundle DIR"]
    (tmp_path / "bundle").mkdir()
    assert main(["app", "--bundle", str(tmp_path / "bundle")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"tarkit app: error: no lm/ in {tmp_path / 'bundle'}")


def test_without_gradio_the_command_names_the_extra(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "gradio", None)  # import gradio now raises ImportError
    assert main(["app"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [f"tarkit app: error: {MISSING_GRADIO}"]


def test_an_answer_the_lm_leaves_empty_says_so(models, image, monkeypatch):
    monkeypatch.setattr(models.i2t, "generate", lambda image, question: "")
    assert Handlers(models).answer(image, "Is there a red circle?") == NO_ANSWER


def test_warnings_that_are_not_about_the_request_stay_out_of_the_page(models, image, monkeypatch):
    def answer_while_the_server_warns(image, question):
        warnings.warn("unclosed event loop", ResourceWarning, stacklevel=1)  # e.g. from gradio's own threads
        return "Yes."

    monkeypatch.setattr(models.i2t, "generate", answer_while_the_server_warns)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        assert Handlers(models).answer(image, "Is there a red circle?") == "Yes."
    assert [(w.category, str(w.message)) for w in seen] == [(ResourceWarning, "unclosed event loop")]
