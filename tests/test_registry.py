"""The plugin registry: built-ins, entry points, lazy loading, contracts and clear errors."""
from __future__ import annotations

import sys

import pytest

from adaptkit import registry
from adaptkit.errors import AdaptkitError, PluginError

MERGE_SRC = '''
"""Fake merges for the registry tests."""
class Mean:
    """Mean of the inputs."""
    name = "fake_mean"
    params = {}
    per_model = frozenset()
    def merge(self, tensors, base, **params):
        return sum(tensors) / len(tensors)
FAKE_MEAN = Mean()
'''


def test_builtins_listed_without_importing_plugins():
    before = {m for m in sys.modules if m.startswith("adaptkit_plugins.")}
    names = registry.names("variant")
    assert "lora" in names and "peft" in registry.names("format")
    assert {m for m in sys.modules if m.startswith("adaptkit_plugins.")} == before or not before
    for e in registry.entries():
        description, problem = registry.describe(e)
        assert problem is None and description, e


def test_listing_imports_nothing_in_a_fresh_interpreter():
    import subprocess

    # Parent packages (empty __init__ files) are imported to find the modules; plugin modules are not.
    code = ("import sys; from adaptkit import registry; from adaptkit.cli import cli; "
            "entries = registry.entries(); [registry.describe(e) for e in entries]; "
            "print(sorted(m for m in sys.modules if m in {e.module for e in entries} or m == 'torch'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_get_checks_contract_and_caches():
    lora = registry.get("variant", "lora")
    assert lora.name == "lora" and registry.get("variant", "lora") is lora


def test_unknown_name_suggests_closest():
    with pytest.raises(AdaptkitError, match="unknown variant plugin 'lroa'; did you mean 'lora'"):
        registry.get("variant", "lroa")
    with pytest.raises(AdaptkitError, match="unknown plugin kind 'merges'; did you mean 'merge'"):
        registry.entries("merges")


def test_third_party_entry_point_loads(fake_plugin_dist):
    fake_plugin_dist("fakeplug-merge", {"adaptkit.merge": {"fake_mean": "fakeplug_m:FAKE_MEAN"}}, {"fakeplug_m": MERGE_SRC})
    e = registry.entry("merge", "fake_mean")
    assert e.source == "fakeplug-merge 1.0"
    assert registry.describe(e) == ("Mean of the inputs.", None)
    assert registry.get("merge", "fake_mean").merge([2.0, 4.0], None) == 3.0


def test_duplicate_names_name_both_sources(fake_plugin_dist):
    fake_plugin_dist("fakeplug-dup", {"adaptkit.variant": {"lora": "fakeplug_dup:X"}}, {"fakeplug_dup": "X = 1\n"})
    with pytest.raises(PluginError, match=r"two variant plugins are named 'lora': adaptkit_plugins.variants.lora:LORA "
                                          r"\(built-in\) and fakeplug_dup:X \(fakeplug-dup 1.0\)"):
        registry.entries()


def test_adaptkit_plugins_env_limits_third_party(fake_plugin_dist, monkeypatch):
    fake_plugin_dist("fakeplug-dup", {"adaptkit.variant": {"lora": "fakeplug_dup:X"}}, {"fakeplug_dup": "X = 1\n"})
    monkeypatch.setenv("ADAPTKIT_PLUGINS", "some-other-dist")
    registry.reload()
    assert registry.entry("variant", "lora").source == registry.BUILTIN


def test_broken_entry_point_is_listed_as_broken_and_the_rest_work(fake_plugin_dist):
    fake_plugin_dist(
        "fakeplug-broken",
        {"adaptkit.merge": {"broken_import": "fakeplug_b:OBJ", "missing_module": "fakeplug_nowhere:OBJ",
                            "fake_mean": "fakeplug_m:FAKE_MEAN", "wrong_shape": "fakeplug_w:OBJ"}},
        {"fakeplug_b": "import not_a_real_module_xyz\nOBJ = 1\n", "fakeplug_m": MERGE_SRC,
         "fakeplug_w": "class W:\n    name = 'wrong_shape'\nOBJ = W()\n"},
    )
    assert registry.describe(registry.entry("merge", "missing_module"))[1] == "module fakeplug_nowhere not found"
    with pytest.raises(PluginError, match="'broken_import' .* failed to load .*ModuleNotFoundError"):
        registry.get("merge", "broken_import")
    with pytest.raises(PluginError, match="does not fulfil the merge contract: missing merge, params"):
        registry.get("merge", "wrong_shape")
    assert registry.get("merge", "fake_mean").merge([1.0, 3.0], None) == 2.0
    assert registry.get("variant", "lora").name == "lora"


def test_object_name_must_match_key(fake_plugin_dist):
    fake_plugin_dist("fakeplug-name", {"adaptkit.merge": {"other_name": "fakeplug_m:FAKE_MEAN"}}, {"fakeplug_m": MERGE_SRC})
    with pytest.raises(PluginError, match="object says its name is 'fake_mean'"):
        registry.get("merge", "other_name")


def test_builtin_descriptions_match_docstrings():
    """The listing reads docstrings from source; it must agree with the imported objects."""
    for e in registry.entries():
        obj = registry.get(e.kind, e.name)
        doc = getattr(obj, "about", None) or type(obj).__doc__ or ""
        assert registry.describe(e)[0] == doc.strip().splitlines()[0], e.name


def test_defaults_name_registered_plugins():
    """registry.toml's [default] table (what the core writes when nothing else is asked) names real plugins."""
    for kind in ("format", "variant"):
        name = registry.default(kind)
        assert name in registry.names(kind)
        registry.get(kind, name)
    assert hasattr(registry.get("format", registry.default("format")), "write")
