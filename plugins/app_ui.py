"""The Gradio app of ``tarkit app``: three tabs (ask about an image, generate, edit) over one set of weights.

The weights are loaded once (:class:`Models`) and every request shares them. A request's own settings (scale,
guidance, sampling, candidates) build a pipeline object around those same modules for that request only: the
pipelines' constructors load nothing when given loaded parts, so this costs a few checks, never a reload, and no
request sees another's settings. All three events share one worker (``concurrency_id``): the models run one
request at a time and the queue holds the rest, so concurrent users wait instead of failing.

Bad input (no image, an unreadable file, a setting the pipelines refuse) is raised as ``gr.Error`` with the
pipelines' one-line message, shown in the page; a scale the LM never saw in training is a warning there. An empty
prompt is allowed, as the pipelines define it, with a warning in the page saying what it does. Each event has an
API name (``/answer``, ``/generate``, ``/edit``) for ``gradio_client``.
"""

from __future__ import annotations

import html
import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import gradio as gr
import torch
from PIL import Image

from tarkit_plugins.pipelines import (
    EditPipeline,
    ImageToTextPipeline,
    PathLike,
    TextToImagePipeline,
    UnseenScaleWarning,
)

Pipeline = TypeVar("Pipeline", bound=TextToImagePipeline)

MODELS = "models"  # the concurrency id every event shares: one request at a time on the weights
NO_IMAGE = "no image: upload one first (PNG, JPEG, WebP, ...)"
NO_ANSWER = "(no answer: the LM ended its turn at once)"  # an empty box would look like a failure
MAX_CANDIDATES = 8
IMAGE_HEIGHT = 256
# Tar's images are small (64 px for the demo): shown enlarged, with their pixels kept sharp.
CSS = ".tar-image img { width: 100%; height: 100%; object-fit: contain; image-rendering: pixelated; }"


@dataclass(frozen=True)
class Sampling:
    """One request's image-sampling settings, as :class:`TextToImagePipeline` takes them (``top_k`` 0: off)."""

    scale: int
    cfg_scale: float
    temperature: float
    top_k: int
    top_p: float
    candidates: int

    @classmethod
    def read(cls, scale: Any, cfg_scale: Any, temperature: Any, top_k: Any, top_p: Any, candidates: Any) -> Sampling:
        """The settings as the page or an API client sent them (numbers, maybe as text); a one-line ``gr.Error``
        for one that is no number. The pipeline checks the values themselves."""
        values = {"scale": scale, "cfg_scale": cfg_scale, "temperature": temperature, "top_k": top_k,
                  "top_p": top_p, "candidates": candidates}
        read = {}
        for (name, value), kind in zip(values.items(), (int, float, float, int, float, int), strict=True):
            try:
                read[name] = kind(float(value)) if kind is int else kind(value)
            except (TypeError, ValueError) as err:
                raise gr.Error(f"{name} must be a number, got {value!r}", print_exception=False) from err
        return cls(**read)

    def describe(self) -> str:
        """The progress line: what is being sampled."""
        many = f"{self.candidates} candidates (self-reflection)" if self.candidates > 1 else "the image"
        return f"sampling {many} at scale {self.scale}, then de-tokenizing"


@dataclass(frozen=True)
class Models:
    """The weights every request shares, loaded once: ``t2i`` holds the LM, the TA-Tok and the de-tokenizer with the
    LM folder's recorded settings (the page's defaults); ``i2t`` reads images with the same LM and TA-Tok."""

    t2i: TextToImagePipeline
    i2t: ImageToTextPipeline

    @classmethod
    def load(cls, lm: PathLike, tatok: PathLike | None, detokenizer: PathLike) -> Models:
        """Load the folders (``tatok`` ``None``: the one the LM records)."""
        t2i = TextToImagePipeline(lm, tatok, detokenizer)
        return cls(t2i, ImageToTextPipeline(t2i.lm, t2i.tatok))

    @property
    def defaults(self) -> Sampling:
        """The recorded settings, as the page shows them first."""
        t2i = self.t2i
        return Sampling(t2i.scale, t2i.cfg_scale, t2i.temperature, t2i.top_k or 0, t2i.top_p, 1)

    def pipeline(self, kind: type[Pipeline], sampling: Sampling) -> Pipeline:
        """A ``kind`` pipeline with one request's settings around the shared modules (nothing is loaded)."""
        detokenizer = self.t2i.autoencoder.detokenizer if self.t2i.autoencoder is not None else None
        return kind(
            self.t2i.lm,
            self.t2i.tatok,
            detokenizer,
            scale=sampling.scale,
            cfg_scale=sampling.cfg_scale,
            temperature=sampling.temperature,
            top_k=sampling.top_k,
            top_p=sampling.top_p,
            candidates=sampling.candidates,
        )

    def generator(self, seed: Any) -> torch.Generator:
        """A generator seeded with ``seed`` on the models' device (sampling draws from it there)."""
        try:
            seed = int(float(seed))
        except (TypeError, ValueError) as err:
            raise gr.Error(f"seed must be a whole number, got {seed!r}", print_exception=False) from err
        device = next(self.t2i.tatok.parameters()).device
        return torch.Generator(device=device).manual_seed(seed)


@contextmanager
def shown_in_page() -> Iterator[None]:
    """The pipelines' one-line refusals as the page's error message, their :class:`UnseenScaleWarning` (a scale the
    LM never saw in training) as its warning; anything else is a bug and keeps its traceback, in the server's log.

    Other warnings are not the user's business (the filters are process-wide, so one may even come from the
    server's own threads): they are issued again as they were."""
    caught: list[warnings.WarningMessage] = []
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", UnseenScaleWarning)
            yield
    except gr.Error:  # already a message for the page (gr.Error is a ValueError)
        raise
    except (ValueError, TypeError, OSError) as err:
        raise gr.Error(for_page(str(err)), print_exception=False) from err
    finally:
        for warning in caught:
            if issubclass(warning.category, UnseenScaleWarning):
                gr.Warning(for_page(str(warning.message)))
            else:
                warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)


def for_page(message: str) -> str:
    """``message`` as the page's toasts show it: they render HTML, so a token such as ``<im_start>`` would vanish
    with the rest of the line; escaped only then, so API clients get the message as the pipeline wrote it."""
    return html.escape(message, quote=False) if "<" in message else message


def image_path(image: Any) -> str:
    """The uploaded file's path: the events that take an image skip gradio's own decoding of it (``preprocess``
    off), so a file no image library reads gets the pipelines' message rather than gradio's failure."""
    if image is None:
        raise gr.Error(NO_IMAGE, print_exception=False)
    if isinstance(image, (str, os.PathLike)):
        return os.fspath(image)
    path = image.get("path") if isinstance(image, dict) else getattr(image, "path", None)
    if not path:
        raise gr.Error("the image arrived without a file; upload it again", print_exception=False)
    return path


def text(value: Any, what: str) -> str:
    """A text input without surrounding blanks (``None``: empty); a one-line ``gr.Error`` for anything else."""
    if value is None:
        return ""
    if not isinstance(value, str):
        raise gr.Error(f"the {what} must be text, got {type(value).__name__}", print_exception=False)
    return value.strip()


class Handlers:
    """What the three tabs (and their API endpoints) run; each call is independent of every other."""

    def __init__(self, models: Models):
        self.models = models

    def answer(self, image: Any, question: Any, progress: gr.Progress = gr.Progress()) -> str:  # noqa: B008
        """``/answer``: the LM's answer to a question about the image (empty: a caption); :data:`NO_ANSWER` when
        the LM says nothing."""
        path, question = image_path(image), text(question, "question")
        if not question:
            gr.Info("no question: describing the image")
        progress(0, desc="reading the image and answering")
        with shown_in_page():
            return self.models.i2t.generate(path, question) or NO_ANSWER

    def generate(
        self,
        prompt: Any,
        scale: Any,
        cfg_scale: Any,
        temperature: Any,
        top_k: Any,
        top_p: Any,
        candidates: Any,
        seed: Any,
        progress: gr.Progress = gr.Progress(),  # noqa: B008 (gradio finds the tracker by this default)
    ) -> Image.Image:
        """``/generate``: an image for the prompt with this request's settings."""
        prompt = text(prompt, "prompt")
        if not prompt:
            gr.Warning("the prompt is empty: this draws an unconditional sample (what guidance contrasts with)")
        sampling = Sampling.read(scale, cfg_scale, temperature, top_k, top_p, candidates)
        generator = self.models.generator(seed)
        with shown_in_page():
            pipeline = self.models.pipeline(TextToImagePipeline, sampling)
            progress(0, desc=sampling.describe())
            return pipeline.generate_image(prompt, generator)

    def edit(
        self,
        image: Any,
        instruction: Any,
        scale: Any,
        cfg_scale: Any,
        temperature: Any,
        top_k: Any,
        top_p: Any,
        candidates: Any,
        seed: Any,
        progress: gr.Progress = gr.Progress(),  # noqa: B008
    ) -> Image.Image:
        """``/edit``: the image edited as the instruction says (empty: redrawn), with this request's settings."""
        path, instruction = image_path(image), text(instruction, "instruction")
        if not instruction:
            gr.Warning("the instruction is empty: this redraws the image")
        sampling = Sampling.read(scale, cfg_scale, temperature, top_k, top_p, candidates)
        generator = self.models.generator(seed)
        with shown_in_page():
            pipeline = self.models.pipeline(EditPipeline, sampling)
            progress(0, desc=sampling.describe())
            return pipeline.edit(path, instruction, generator)


def sampling_inputs(models: Models, tab: str, open_: bool) -> list[gr.components.Component]:
    """The settings of one image-making tab, starting at the LM folder's recorded ones."""
    defaults, tatok = models.defaults, models.t2i.tatok
    with gr.Accordion("Sampling", open=open_):
        with gr.Row():
            scale = gr.Dropdown(
                list(tatok.pool_scales), value=defaults.scale, label="Scale", info="TA-Tok pool scale",
                elem_id=f"{tab}-scale",
            )
            cfg_scale = gr.Slider(1, 10, value=defaults.cfg_scale, step=0.5, label="CFG scale", info="1: unguided")
            temperature = gr.Slider(0, 2, value=defaults.temperature, step=0.05, label="Temperature", info="0: greedy")
        with gr.Row():
            top_k = gr.Slider(
                0, max(tatok.num_codes, defaults.top_k), value=defaults.top_k, step=1, label="Top-k", info="0: off"
            )
            top_p = gr.Slider(0.05, 1, value=defaults.top_p, step=0.01, label="Top-p", info="1: off")
            candidates = gr.Slider(
                1, MAX_CANDIDATES, value=1, step=1, label="Candidates", info="> 1: self-reflection keeps the best"
            )
            seed = gr.Number(0, precision=0, minimum=0, label="Seed", elem_id=f"{tab}-seed")
    return [scale, cfg_scale, temperature, top_k, top_p, candidates, seed]


def build_app(models: Models) -> gr.Blocks:
    """The page: one tab per pipeline, with the queue on."""
    handlers = Handlers(models)
    shared = {"concurrency_id": MODELS, "concurrency_limit": 1}
    with gr.Blocks(title="tarkit: Tar", analytics_enabled=False) as blocks:  # no telemetry: may run offline
        gr.Markdown("## Tar: ask about an image, generate one, edit one")
        with gr.Tab("Ask about an image", id="ask"):
            with gr.Row():
                image = gr.Image(
                    label="Image", type="filepath", sources=["upload", "clipboard"], height=IMAGE_HEIGHT,
                    elem_id="ask-image", elem_classes="tar-image",
                )
                with gr.Column():
                    question = gr.Textbox(
                        label="Question", placeholder="empty: Describe the image.", elem_id="ask-question"
                    )
                    ask = gr.Button("Ask", variant="primary", elem_id="ask-button")
                    answer = gr.Textbox(label="Answer", interactive=False, elem_id="ask-answer")
            # preprocess off: the handler reads the file itself (see image_path)
            ask.click(handlers.answer, [image, question], answer, api_name="answer", preprocess=False, **shared)
        with gr.Tab("Generate", id="generate"):
            with gr.Row():
                with gr.Column():
                    prompt = gr.Textbox(
                        label="Prompt", placeholder="e.g. a photo of a red circle", elem_id="generate-prompt"
                    )
                    settings = sampling_inputs(models, "generate", open_=True)
                    draw = gr.Button("Generate", variant="primary", elem_id="generate-button")
                generated = gr.Image(label="Generated", type="pil", format="png", interactive=False,
                                     height=IMAGE_HEIGHT, elem_id="generate-image", elem_classes="tar-image")
            draw.click(handlers.generate, [prompt, *settings], generated, api_name="generate", **shared)
        with gr.Tab("Edit", id="edit"):
            with gr.Row():
                with gr.Column():
                    source = gr.Image(label="Image", type="filepath", sources=["upload", "clipboard"],
                                      height=IMAGE_HEIGHT, elem_id="edit-image", elem_classes="tar-image")
                    instruction = gr.Textbox(
                        label="Instruction", placeholder="e.g. make the circle blue", elem_id="edit-instruction"
                    )
                    settings = sampling_inputs(models, "edit", open_=False)
                    change = gr.Button("Edit", variant="primary", elem_id="edit-button")
                edited = gr.Image(label="Edited", type="pil", format="png", interactive=False, height=IMAGE_HEIGHT,
                                  elem_id="edit-result", elem_classes="tar-image")
            change.click(
                handlers.edit, [source, instruction, *settings], edited, api_name="edit", preprocess=False, **shared
            )
    return blocks.queue(max_size=64)


def serve(blocks: gr.Blocks, host: str, port: int, share: bool = False, block: bool = True) -> str:
    """Launch the app; returns its local URL. ``block``: serve until interrupted (the command), else in the
    background (tests; ``blocks.close()`` stops it)."""
    _, url, _ = blocks.launch(
        server_name=host, server_port=port, share=share, prevent_thread_lock=not block, max_file_size="50mb", css=CSS
    )
    return url
