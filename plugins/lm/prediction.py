"""What ``tarkit predict`` does with an LM: each row goes to its task's formatter, which builds the prompt; the
task's ``output`` says whether an answer or an image is generated after it.

    row (task, text, image?) -> formatter.prompt -> text: generate_text  -> <predict_dir>/answers.jsonl
                                                 -> image: image codes (CFG against the prompt without its
                                                    text) -> de-tokenizer -> GenEval layout for GenEval rows,
                                                    else <predict_dir>/<task>/<id>_<k>.png (+ codes)

Each answer is appended to ``answers.jsonl`` with its batch and each image written whole, the codes file last
(the item's marker), so a re-run into the same folder skips every finished row
(:mod:`tarkit_plugins.prediction_files`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from tarkit.interfaces import TaskFormatter
from tarkit_plugins.evaluation import geneval_folder, write_geneval_sample
from tarkit_plugins.pipelines import ImageToTextPipeline, TextToImagePipeline
from tarkit_plugins.prediction_files import ResumableJsonl, report_skipped, save_image, write_text


class TaskPredictor:
    """Answers and draws for rows of any registered task, with the LM module's pipelines' settings.

    Args:
        answerer: the pipeline whose scale and text generation answer ``output == "text"`` tasks.
        drawer: the pipeline whose sampling, guidance and de-tokenizer draw ``output == "image"`` tasks.
        formatters: the registered tasks by name.
        out: the predict folder.
        images_per_prompt: images drawn per image-output row.
        generator: the random stream of every draw.
    """

    def __init__(
        self,
        answerer: ImageToTextPipeline,
        drawer: TextToImagePipeline,
        formatters: dict[str, TaskFormatter],
        out: str | Path,
        images_per_prompt: int,
        generator: torch.Generator,
    ):
        self.answerer, self.drawer, self.formatters = answerer, drawer, formatters
        self.out, self.images_per_prompt, self.generator = Path(out), images_per_prompt, generator
        self.answers = ResumableJsonl(self.out / "answers.jsonl", key="question_id")
        self.skipped = 0

    def formatter(self, task: str) -> TaskFormatter:
        if task not in self.formatters:
            hint = " (a folder of images is read by a de-tokenizer's predict, not the LM's)" if task == "image" else ""
            raise ValueError(
                f"no task formatter for {task!r}{hint}; installed tasks: {', '.join(sorted(self.formatters))}"
            )
        return self.formatters[task]

    def samples(self, batch: dict[str, Any], rows: list[int], formatter: TaskFormatter) -> list[dict[str, Any]]:
        """Each row as a formatter sample: its text, and its image's TA-Tok codes where the task reads one."""
        input_codes: list[torch.Tensor | None] = [None] * len(rows)
        if "input_image" in formatter.needs:
            missing = [batch["id"][i] for i in rows if not bool(batch["has_image"][i])]
            if missing:
                raise ValueError(f"task {formatter.name} needs an input image; rows {missing} have none")
            pixels = self.answerer.pixels(batch["image"][rows])
            input_codes = list(self.answerer.tatok.tokenize(pixels, self.answerer.scale).cpu())
        scale_index = self.drawer.tatok.pool_scales.index(self.drawer.scale)
        return [
            {"task": formatter.name, "text": batch["text"][i], "answer": "", "input_codes": codes,
             "target_codes": None, "scale_index": scale_index}
            for i, codes in zip(rows, input_codes, strict=True)
        ]  # fmt: skip

    def predict(self, batch: dict[str, Any]) -> None:
        """Generate for every row of a ``prompts`` batch (``kind`` is the row's task)."""
        tokenizer, vocab = self.answerer.tokenizer, self.answerer.vocab
        for task in sorted(set(batch["kind"])):
            formatter = self.formatter(task)
            rows = [i for i, k in enumerate(batch["kind"]) if k == task]
            todo = [i for i in rows if not self.finished(batch, i, formatter)]
            self.skipped += len(rows) - len(todo)
            if not todo:
                continue
            rows = todo
            samples = self.samples(batch, rows, formatter)
            prompts = [formatter.prompt(s, tokenizer, vocab) for s in samples]
            if formatter.output == "text":
                answers = self.answerer.answer_prompts(prompts)
                self.answers.append(
                    {"question_id": batch["id"][i], "task": task, "text": a} for i, a in zip(rows, answers, strict=True)
                )
            else:
                uncond = [formatter.prompt({**s, "text": ""}, tokenizer, vocab) for s in samples]
                self.draw(batch, rows, prompts, uncond, task)

    def finished(self, batch: dict[str, Any], row: int, formatter: TaskFormatter) -> bool:
        """Whether an earlier run into this folder already wrote this row's answer or its images' marker."""
        if formatter.output == "text":
            return batch["id"][row] in self.answers.done
        return self.marker(batch, row, formatter.name).is_file()

    def marker(self, batch: dict[str, Any], row: int, task: str) -> Path:
        """The file written last for an image row: its codes, in GenEval's layout for GenEval prompts."""
        if "tag" in json.loads(batch["record"][row]):
            return geneval_folder(self.out, int(batch["id"][row])) / "codes.json"
        return self.out / task / f"{batch['id'][row]}_codes.json"

    def draw(
        self, batch: dict[str, Any], rows: list[int], prompts: list[list[int]], uncond: list[list[int]], task: str
    ) -> None:
        per = self.images_per_prompt
        codes = self.drawer.codes_for_prompts(
            [p for p in prompts for _ in range(per)], [u for u in uncond for _ in range(per)], self.generator
        )
        drawn = self.drawer.decode(codes, self.generator) if self.drawer.autoencoder is not None else []
        for j, i in enumerate(rows):
            images, row_codes = drawn[j * per : (j + 1) * per], codes[j * per : (j + 1) * per].tolist()
            record = json.loads(batch["record"][i])
            if "tag" in record:  # a GenEval prompt: GenEval's folder layout
                write_geneval_sample(self.out, int(batch["id"][i]), record, images)
            else:
                (self.out / task).mkdir(parents=True, exist_ok=True)
                for k, image in enumerate(images):
                    save_image(image, self.out / task / f"{batch['id'][i]}_{k}.png")
            write_text(self.marker(batch, i, task), json.dumps({"scale": self.drawer.scale, "codes": row_codes}) + "\n")

    def finish(self) -> None:
        report_skipped(self.skipped, self.out)
