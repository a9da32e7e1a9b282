"""Saved folders name their parts by registry entry, record the tarkit version, and folders written before
that (Python class paths, tarkit 0.1.0) still load and give the same outputs."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from tarkit.pretrained import PretrainedLoadError
from tarkit.tatok import TATok
from tarkit_plugins.detok.ar import AutoregressiveDeTokenizer

OLD = Path(__file__).parent / "fixtures" / "folders_v0_1"  # written by tarkit at commit e7127f2


def images() -> torch.Tensor:
    return torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))


def test_folders_written_with_class_paths_still_load_and_give_their_outputs():
    expected = json.loads((OLD / "expected.json").read_text())
    assert json.loads((OLD / "tatok" / "config.json").read_text())["class_path"] == "tarkit.tatok.TATok"
    tatok = TATok.from_pretrained(OLD / "tatok").eval()
    codes = tatok.tokenize(images(), 1)
    assert codes.tolist() == expected["tatok_codes_scale1"]
    detok = AutoregressiveDeTokenizer.from_pretrained(OLD / "ar_detok").eval()
    drawn = detok.sample_codes(tatok.decode_features(codes), generator=torch.Generator().manual_seed(0))
    assert drawn.tolist() == expected["ar_codes_seed0"]


def test_new_folders_name_registered_parts_by_group_and_name(tmp_path):
    detok = AutoregressiveDeTokenizer.from_pretrained(OLD / "ar_detok")
    config = json.loads((detok.save_pretrained(tmp_path / "ar") / "config.json").read_text())
    assert (config["group"], config["name"]) == ("tarkit.detokenizers", "ar") and "class_path" not in config
    assert config["tarkit_version"]
    assert config["init_args"]["vq"]["class_path"].endswith("PixelVQ")  # an internal part: no registry name
    tatok = json.loads(
        (TATok.from_pretrained(OLD / "tatok").save_pretrained(tmp_path / "t") / "config.json").read_text()
    )
    assert tatok["class_path"] == "tarkit.tatok.TATok"  # a core class
    assert {k: tatok["init_args"]["encoder"][k] for k in ("group", "name")} == {
        "group": "tarkit.encoders",
        "name": "siglip2",
    }
    reloaded = AutoregressiveDeTokenizer.from_pretrained(tmp_path / "ar")
    assert all(
        torch.equal(a, b) for a, b in zip(reloaded.state_dict().values(), detok.state_dict().values(), strict=True)
    )


@pytest.mark.parametrize(
    ("identity", "message"),
    [
        (
            {"group": "tarkit.detokenizers", "name": "no_such_detok"},
            "names tarkit.detokenizers:no_such_detok, which is not installed",
        ),
        ({"class_path": "no_such_package.Model"}, "names no_such_package.Model, which cannot be imported"),
    ],
)
def test_a_folder_naming_a_part_that_is_not_installed_is_a_one_line_error(tmp_path, identity, message):
    folder = shutil.copytree(OLD / "ar_detok", tmp_path / "ar")
    config = json.loads((folder / "config.json").read_text())
    config = {**identity, "init_args": config["init_args"]}
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(PretrainedLoadError, match=message) as err:
        AutoregressiveDeTokenizer.from_pretrained(folder)
    assert "\n" not in str(err.value)
