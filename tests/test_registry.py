import importlib.metadata
from types import SimpleNamespace

import pytest

from tarkit.interfaces import CodebookProjection
from tarkit.registry import DISABLE_AUTOLOAD_ENV, GROUPS, Registry, TarkitPluginWarning, UnknownPartError
from tarkit_plugins.codebooks import LearnedCodebook

REAL_ENTRY_POINTS = importlib.metadata.entry_points


def fake_entry_points(table):
    """`table`: group -> [(name, target, distribution)]; mimics importlib.metadata.entry_points(group=...)."""

    def entry_points(group=None, **selection):
        if group is None:  # another library (triton, imported lazily by torch) lists its own groups
            return REAL_ENTRY_POINTS(**selection)
        return [
            SimpleNamespace(name=name, value=target, dist=SimpleNamespace(name=dist))
            for name, target, dist in table.get(group, [])
        ]

    return entry_points


@pytest.fixture
def patched(monkeypatch):
    def install(table):
        monkeypatch.setattr(importlib.metadata, "entry_points", fake_entry_points(table))
        return Registry()

    return install


def test_groups_are_the_documented_nine_plus_commands():
    assert GROUPS[:9] == (
        "tarkit.encoders",
        "tarkit.codebooks",
        "tarkit.quantizers",
        "tarkit.tatok_converters",
        "tarkit.detokenizers",
        "tarkit.lms",
        "tarkit.datamodules",
        "tarkit.tasks",
        "tarkit.modules",
    )
    assert "tarkit.commands" in GROUPS


def test_discovery_is_lazy_and_names_the_distribution(patched):
    reg = patched({"tarkit.codebooks": [("mine", "no_such_module_xyz:Thing", "third-party")]})
    entries = reg.entries("tarkit.codebooks")  # must not import anything
    assert entries["mine"].distribution == "third-party"
    assert entries["mine"].class_path == "no_such_module_xyz.Thing"


def test_loads_registered_class_and_short_group_names(patched):
    reg = patched({"tarkit.codebooks": [("learned", "tarkit_plugins.codebooks:LearnedCodebook", "tarkit")]})
    assert reg.get("codebooks", "learned") is LearnedCodebook
    assert isinstance(reg.create("tarkit.codebooks", "learned", num_codes=3, dim=2), CodebookProjection)


def test_broken_plugin_warns_once_and_others_still_load(patched):
    reg = patched(
        {
            "tarkit.codebooks": [
                ("broken", "no_such_module_xyz:Thing", "broken-dist"),
                ("learned", "tarkit_plugins.codebooks:LearnedCodebook", "tarkit"),
            ]
        }
    )
    with pytest.warns(TarkitPluginWarning) as caught:
        loaded = reg.load_group("tarkit.codebooks")
    assert list(loaded) == ["learned"]
    assert len(caught) == 1
    message = str(caught[0].message)
    assert "broken-dist" in message and "'broken'" in message and "no_such_module_xyz" in message
    assert "\n" not in message


def test_plugin_of_the_wrong_type_is_skipped_with_a_warning(patched):
    reg = patched({"tarkit.codebooks": [("notacodebook", "collections:OrderedDict", "odd-dist")]})
    with pytest.warns(TarkitPluginWarning, match="not a subclass of tarkit.interfaces.CodebookProjection"):
        assert reg.load_group("tarkit.codebooks") == {}


def test_duplicate_name_warns_and_builtin_wins(patched):
    reg = patched(
        {
            "tarkit.codebooks": [
                ("learned", "other_pkg:Other", "other-dist"),
                ("learned", "tarkit_plugins.codebooks:LearnedCodebook", "tarkit"),
            ]
        }
    )
    with pytest.warns(TarkitPluginWarning, match="duplicate tarkit.codebooks name 'learned'.*other-dist"):
        entries = reg.entries("tarkit.codebooks")
    assert entries["learned"].distribution == "tarkit"


def test_disable_autoload_keeps_only_builtins(patched, monkeypatch):
    reg = patched(
        {
            "tarkit.codebooks": [
                ("learned", "tarkit_plugins.codebooks:LearnedCodebook", "tarkit"),
                ("extra", "other_pkg:Other", "other-dist"),
            ]
        }
    )
    monkeypatch.setenv(DISABLE_AUTOLOAD_ENV, "1")
    assert list(reg.entries("tarkit.codebooks")) == ["learned"]


def test_unknown_name_lists_group_and_available(patched):
    reg = patched({"tarkit.codebooks": [("learned", "tarkit_plugins.codebooks:LearnedCodebook", "tarkit")]})
    with pytest.raises(UnknownPartError, match=r"'nope' for tarkit.codebooks \(available: learned\)"):
        reg.get("tarkit.codebooks", "nope")


def test_unknown_group_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown plugin group 'tarkit.nothing'"):
        Registry().entries("tarkit.nothing")


def test_resolve_short_name_for_a_type_hint(patched):
    reg = patched({"tarkit.codebooks": [("learned", "tarkit_plugins.codebooks:LearnedCodebook", "tarkit")]})
    assert reg.groups_accepting(CodebookProjection) == ["tarkit.codebooks"]
    assert reg.resolve(CodebookProjection, "learned") == "tarkit_plugins.codebooks.LearnedCodebook"
    assert reg.resolve(CodebookProjection, "missing") is None
