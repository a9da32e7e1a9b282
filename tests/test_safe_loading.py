"""No file tarkit reads can run code: checkpoints are read weights-only (a pickled object is refused in one line and
its payload never runs), weights are safetensors, and nothing asks for ``trust_remote_code``."""

import ast
import os
from pathlib import Path

import pytest
import torch

from tarkit.cli import main
from tarkit.pretrained import PretrainedLoadError
from tarkit.tatok import load_tatok
from tarkit_plugins.detok.ar import load_official_ar_detokenizer
from tarkit_plugins.detok.pixel_vq import load_pixel_vq
from tarkit_plugins.tatok.reference_api import TextAlignedTokenizer

ROOT = Path(__file__).resolve().parents[1]
OLD = ROOT / "tests" / "fixtures" / "folders_v0_1"


class Payload:
    """Unpickled, it creates ``marker`` (``builtins.open`` or ``os.system``): proof that code ran."""

    def __init__(self, marker: Path, via: str):
        self.marker, self.via = marker, via

    def __reduce__(self):
        if self.via == "os.system":
            return os.system, (f"touch {self.marker}",)
        return open, (str(self.marker), "w")


@pytest.fixture(params=["open", "os.system"])
def evil(request, tmp_path):
    """``write(path, layout)`` saves a file of that layout with the payload among its tensors; returns the marker
    the payload would create."""
    marker = tmp_path / f"ran_{request.param.replace('.', '_')}"

    def write(path: Path, layout: str) -> Path:
        weights = {"w": torch.zeros(2), "bias": Payload(marker, request.param)}
        content = {
            "ta_tok": {"model": {"args": {}, "sd": weights}},  # csuhan/Tar ta_tok.pth
            "ar_dtok": {"model": {"name": "llama-abs-tiny", "args": {"cls_token_num": 16}, "sd": weights}},
            "llamagen_vq": {"model": weights},  # vq_ds16_t2i.pt
            "lightning": {"state_dict": weights, "epoch": 0, "global_step": 1, "pytorch-lightning_version": "2.6.6"},
        }[layout]
        torch.save(content, path)
        return marker

    return write


def refused(info: pytest.ExceptionInfo, path: Path) -> None:
    message = str(info.value)
    assert "\n" not in message and message.startswith(str(path))
    assert "holds a pickled Python object" in message and "unpickling it could run code" in message
    assert "re-save its tensors (a state_dict, or safetensors)" in message


def test_the_payload_is_live(evil, tmp_path):
    """The files below are really malicious: read as torch.load's unsafe mode reads them, the payload runs."""
    marker = evil(tmp_path / "ta_tok.pth", "ta_tok")
    torch.load(tmp_path / "ta_tok.pth", weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize(
    ("layout", "load"),
    [
        ("ta_tok", lambda path: load_tatok(path)),
        ("ta_tok", lambda path: TextAlignedTokenizer.from_checkpoint(str(path))),
        ("ar_dtok", lambda path: load_official_ar_detokenizer(str(path), vq=str(OLD / "ar_detok"))),
        ("llamagen_vq", lambda path: load_pixel_vq(str(path))),
    ],
    ids=["ta_tok.pth via load_tatok", "ta_tok.pth via TextAlignedTokenizer", "ar_dtok_*.pth", "vq_ds16_t2i.pt"],
)
def test_a_reference_file_with_a_pickled_payload_is_refused_and_never_runs(evil, tmp_path, monkeypatch, layout, load):
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")  # torch's opt-out changes nothing: tarkit says True
    path = tmp_path / f"{layout}.pth"
    marker = evil(path, layout)
    with pytest.raises(PretrainedLoadError) as info:
        load(path)
    refused(info, path)
    assert not marker.exists()


RECIPE = """\
model:
  class_path: example_regressor
  init_args:
    codebook:
      class_path: learned
      init_args: {{num_codes: 4, dim: 8}}
data:
  class_path: example_random
trainer:
  accelerator: cpu
  logger: false
  max_steps: {steps}
  limit_val_batches: 1
  enable_progress_bar: false
  enable_model_summary: false
  default_root_dir: {run}
"""


def test_tarkit_fit_refuses_a_lightning_checkpoint_with_a_pickled_payload(evil, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(RECIPE.format(steps=1, run=tmp_path / "run"))
    path = tmp_path / "evil.ckpt"
    marker = evil(path, "lightning")
    with pytest.raises(SystemExit) as info:
        main(["fit", "--config", str(recipe), "--ckpt_path", str(path)])
    assert info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith(f"tarkit: error: {path} holds a pickled Python object")
    assert not marker.exists()


def test_tarkit_fit_resumes_from_its_own_checkpoint_file(tmp_path):
    """The up-front check accepts what tarkit writes: a run resumes from an explicit ``--ckpt_path FILE``."""
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(RECIPE.format(steps=2, run=tmp_path / "run"))
    main(["fit", "--config", str(recipe)])
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == 2
    recipe.write_text(RECIPE.format(steps=3, run=tmp_path / "run"))
    main(["fit", "--config", str(recipe), "--ckpt_path", str(last)])
    assert torch.load(last, weights_only=True)["global_step"] == 3  # went on from step 2


def test_lightnings_own_checkpoint_names_are_loaded_weights_only(evil, tmp_path, monkeypatch, capsys):
    """``--ckpt_path last`` is resolved by Lightning, after tarkit's up-front check; tarkit passes
    ``weights_only=True`` explicitly, so even with torch's opt-out set the payload in last.ckpt never runs, and
    the refusal is one line."""
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(RECIPE.format(steps=1, run=tmp_path / "run"))
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    marker = evil(tmp_path / "run" / "checkpoints" / "last.ckpt", "lightning")
    with pytest.raises(SystemExit) as info:
        main(["fit", "--config", str(recipe), "--ckpt_path", "last"])
    err = capsys.readouterr().err.strip()
    assert info.value.code == 2 and err.count("\n") == 0
    assert err.startswith("tarkit: error: the checkpoint to resume from holds more than tensors, refused unread")
    assert not marker.exists()


# --- the source never asks for unsafe loading --------------------------------------------------------------------


def calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            name = ast.unparse(node.func)
            keywords = {k.arg: k.value for k in node.keywords}
            yield node, name, keywords


def is_true(value: ast.AST | None) -> bool:
    return isinstance(value, ast.Constant) and value.value is True


SOURCES = sorted(p for folder in ("tarkit", "plugins", "benchmarks") for p in (ROOT / folder).rglob("*.py"))


def test_every_torch_load_is_weights_only_and_nothing_unpickles_or_trusts_remote_code():
    assert len(SOURCES) > 50  # the scan sees the whole source
    problems = []
    for path in SOURCES:
        source = path.read_text()
        where = path.relative_to(ROOT)
        for node, name, keywords in calls(ast.parse(source)):
            if name == "torch.load" and not is_true(keywords.get("weights_only")):
                problems.append(f"{where}:{node.lineno}: torch.load without weights_only=True")
            if name in ("pickle.load", "pickle.loads", "pickle.Unpickler", "dill.load", "dill.loads"):
                problems.append(f"{where}:{node.lineno}: {name} unpickles")
            if "trust_remote_code" in keywords and not (
                isinstance(keywords["trust_remote_code"], ast.Constant) and keywords["trust_remote_code"].value is False
            ):
                problems.append(f"{where}:{node.lineno}: {name} passes trust_remote_code")
        if "trust_remote_code=True" in source:
            problems.append(f"{where}: trust_remote_code=True")
    assert not problems, problems
