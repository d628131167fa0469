"""Packaging: what a user gets from `pip install`, and what a third party gets from the registry.

The slow tests build a real wheel of adaptkit from a copy of the source tree, install it with
torch into a clean virtual environment (no system site packages) and check from there that
`registry.toml` ships inside the package, that `import adaptkit` is the installed copy, and that
every registry entry resolves. Then they install `examples/plugin-example` into the same
environment and use its `median` merge method and `outer` variant through the registry and the
CLI. The fast tests check the editable install of the dev environment and the example's plugins
in-process.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import tomllib
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from adaptkit import registry, spec
from adaptkit.io.store import open_store

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "plugin-example"
EXAMPLE_DIST = "adaptkit-plugin-example"
EXAMPLE_VERSION = tomllib.loads((EXAMPLE / "pyproject.toml").read_text())["project"]["version"]
EXAMPLE_SOURCE = f"{EXAMPLE_DIST} {EXAMPLE_VERSION}"
TORCH = "torch==2.13.0"
# Top-level entries of the source tree that a wheel build does not need (copied elsewhere).
NOT_COPIED = {".venv", ".git", "build", "dist", "tests", "benchmarks", "examples", ".pytest_cache"}


# -- helpers ---------------------------------------------------------------------------------------
def _env(**extra: str) -> dict[str, str]:
    """The environment for commands run in the clean venv: nothing pointing back at the dev tree."""
    env = {k: v for k, v in os.environ.items()
           if k not in {"PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "ADAPTKIT_PLUGINS", "PYTHONSTARTUP"}}
    env["PYTHONNOUSERSITE"] = "1"
    env.update(extra)
    return env


def _run(args: list[str | Path], *, cwd: Path, env: dict[str, str] | None = None, timeout: int = 600):
    proc = subprocess.run([str(a) for a in args], cwd=cwd, env=env or _env(), capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, (
        f"{' '.join(map(str, args))} exited {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}\n"
        f"--- stderr\n{proc.stderr[-4000:]}"
    )
    return proc


def _ignore_for_copy(root: Path):
    def ignore(directory: str, names: list[str]) -> set[str]:
        skip = {n for n in names if n == "__pycache__" or n.endswith((".egg-info", ".so"))}  # (.so: built in place)
        if Path(directory) == root:
            skip |= NOT_COPIED & set(names)
        return skip
    return ignore


def _copy_source(src: Path, dst: Path) -> Path:
    """A copy of a source tree to build from, so the build leaves nothing in the working tree.

    Symlinks are kept as links: the wheel must contain the file behind `plugins/registry.toml`.
    """
    shutil.copytree(src, dst, symlinks=True, ignore=_ignore_for_copy(src))
    return dst


@dataclass(frozen=True)
class Venv:
    root: Path
    workdir: Path  # an empty folder to run commands in, so '' on sys.path is not the source tree
    source: Path  # the copy of the source tree the wheel was built from

    @property
    def python(self) -> Path:
        return self.root / "bin" / "python"

    @property
    def adaptkit(self) -> Path:
        return self.root / "bin" / "adaptkit"

    def py(self, code: str, **env: str) -> str:
        return _run([self.python, "-c", textwrap.dedent(code)], cwd=self.workdir, env=_env(**env)).stdout

    def cli(self, *args: str | Path, **env: str) -> subprocess.CompletedProcess:
        return _run([self.adaptkit, *args], cwd=self.workdir, env=_env(**env))

    def cli_json(self, *args: str | Path, **env: str):
        return json.loads(self.cli(*args, "--json", **env).stdout)


def _builtins(registry_toml: Path) -> set[tuple[str, str]]:
    table = tomllib.loads(registry_toml.read_text())
    return {(kind, name) for kind, items in table.items() if kind != "default" for name in items}


# -- fixtures: one wheel and one virtual environment for the whole module --------------------------
@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> tuple[Path, Path]:
    """(the adaptkit wheel, the source copy it was built from)."""
    tmp = tmp_path_factory.mktemp("wheel")
    source = _copy_source(REPO, tmp / "src")
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", tmp / "dist", source], cwd=tmp)
    (found,) = (tmp / "dist").glob("adaptkit-*.whl")
    return found, source


@pytest.fixture(scope="module")
def venv(tmp_path_factory, wheel) -> Venv:
    """A clean virtual environment with torch and the adaptkit wheel (other deps from the index)."""
    whl, source = wheel
    tmp = tmp_path_factory.mktemp("venv")
    root, workdir = tmp / "venv", tmp / "work"
    workdir.mkdir()
    _run([sys.executable, "-m", "venv", root], cwd=tmp)  # no --system-site-packages
    _run([root / "bin" / "python", "-m", "pip", "install", "-q", TORCH, whl], cwd=workdir)
    return Venv(root, workdir, source)


@pytest.fixture(scope="module")
def venv_with_example(venv, tmp_path_factory) -> Venv:
    """The same environment with examples/plugin-example installed (built from a copy)."""
    source = _copy_source(EXAMPLE, tmp_path_factory.mktemp("example") / "plugin-example")
    _run([venv.python, "-m", "pip", "install", "-q", "--no-deps", source], cwd=venv.workdir)
    return venv


def _write_outer_adapter(folder: Path, scale: float) -> dict[str, torch.Tensor]:
    """A tiny `outer` adapter on three modules, written as a third party would."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    shapes = {"layers.0.q_proj": (8, 4), "layers.0.v_proj": (8, 4), "layers.1.mlp.up_proj": (16, 8)}
    tensors = {}
    for module, (out_features, in_features) in shapes.items():
        tensors[f"base_model.model.{module}.outer_u"] = torch.randn(out_features, generator=g)
        tensors[f"base_model.model.{module}.outer_v"] = torch.randn(in_features, generator=g)
    folder.mkdir(parents=True)
    config = {"adaptkit_variant": "outer", "scale": scale, "target_modules": ["q_proj", "v_proj", "up_proj"]}
    (folder / "adapter_config.json").write_text(json.dumps(config))
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    return tensors


# -- 1. the wheel in a clean virtual environment ---------------------------------------------------
@pytest.mark.slow
def test_wheel_ships_registry_toml_as_a_file(wheel):
    whl, source = wheel
    with zipfile.ZipFile(whl) as zf:
        info = zf.getinfo("adaptkit_plugins/registry.toml")
        is_link = (info.external_attr >> 16) & 0o170000 == 0o120000
        assert not is_link, "registry.toml is stored in the wheel as a symlink"
        shipped = zf.read(info).decode()
    assert tomllib.loads(shipped) == tomllib.loads((source / "registry.toml").read_text())


@pytest.mark.slow
def test_the_installed_wheel_walks_in_c(venv):
    """Where a C compiler is found, the wheel carries `_follow.c` and `_mix.c` compiled and the installed
    package runs them (without one, the install goes on: numpy walks, see `_introsort`, and torch mixes)."""
    import shutil
    import sysconfig

    if not shutil.which(sysconfig.get_config_var("CC").split()[0]):
        pytest.skip("no C compiler")
    found = venv.py("from adaptkit_plugins.merges import _mixing, _select\n"
                    "print(_select.native.__file__); print(_mixing.native.__file__)").split()
    assert len(found) == 2 and all(Path(w).resolve().is_relative_to(venv.root.resolve()) for w in found), found


@pytest.mark.slow
def test_installed_package_is_the_wheel_and_every_entry_resolves(venv):
    report = json.loads(venv.py("""
        import importlib.resources, json, os, sys, sysconfig
        import adaptkit, adaptkit_plugins
        from adaptkit import registry
        toml = importlib.resources.files("adaptkit_plugins").joinpath("registry.toml")
        out = {"adaptkit": adaptkit.__file__, "adaptkit_plugins": adaptkit_plugins.__file__,
               "toml": os.fspath(toml), "toml_is_link": os.path.islink(os.fspath(toml)),
               "site": sysconfig.get_paths()["purelib"], "resolved": [], "failed": []}
        for e in registry.entries():
            try:
                obj = registry.get(e.kind, e.name)
                out["resolved"].append([e.kind, e.name, e.source, sys.modules[type(obj).__module__].__file__])
            except Exception as exc:
                out["failed"].append([e.kind, e.name, f"{type(exc).__name__}: {exc}"])
        print(json.dumps(out))
    """))
    site = Path(report["site"]).resolve()
    assert site.is_relative_to(venv.root.resolve())
    for key in ("adaptkit", "adaptkit_plugins", "toml"):
        where = Path(report[key])
        assert where.resolve().is_relative_to(site), f"{key} resolves to {where}, outside {site}"
        assert not where.resolve().is_relative_to(REPO), f"{key} resolves into the source tree: {where}"
    assert not report["toml_is_link"], "the installed registry.toml is a symlink"
    assert report["failed"] == []
    resolved = {(kind, name) for kind, name, source, _ in report["resolved"] if source == registry.BUILTIN}
    assert resolved == _builtins(venv.source / "registry.toml")
    for kind, name, _, module_file in report["resolved"]:
        assert Path(module_file).resolve().is_relative_to(site), f"{kind} {name} loaded from {module_file}"


@pytest.mark.slow
def test_installed_cli_checks_every_builtin_ok(venv):
    rows = venv.cli_json("plugins", "--check")
    builtins = {(r["kind"], r["name"]): r for r in rows if r["source"] == registry.BUILTIN}
    assert set(builtins) == _builtins(venv.source / "registry.toml")
    broken = {key: r["status"] for key, r in builtins.items() if r["status"] != "ok"}
    assert broken == {}
    assert all(r["description"] for r in builtins.values()), "a built-in has no one-line description"


# -- 2. a third-party plugin package in the same environment --------------------------------------
@pytest.mark.slow
def test_example_plugins_are_listed_with_their_source(venv_with_example):
    rows = {(r["kind"], r["name"]): r for r in venv_with_example.cli_json("plugins")}
    for key in [("merge", "median"), ("variant", "outer")]:
        assert key in rows, f"{key} not listed"
        assert rows[key]["source"] == EXAMPLE_SOURCE
        assert rows[key]["status"] == "listed"
    assert rows[("merge", "median")]["description"].startswith("Element-wise median")
    assert rows[("variant", "outer")]["description"].startswith("Rank-1 outer-product adapter")
    checked = venv_with_example.cli_json("plugins", "--check")
    assert {(r["kind"], r["name"]): r["status"] for r in checked if r["status"] != "ok"} == {}


@pytest.mark.slow
def test_example_plugins_obey_adaptkit_plugins(venv_with_example):
    def listed(value: str) -> set[tuple[str, str]]:
        rows = venv_with_example.cli_json("plugins", ADAPTKIT_PLUGINS=value)
        return {(r["kind"], r["name"]) for r in rows}

    builtins = _builtins(venv_with_example.source / "registry.toml")
    hidden = listed("something-else")
    assert ("merge", "median") not in hidden and ("variant", "outer") not in hidden
    assert builtins <= hidden, "ADAPTKIT_PLUGINS must not hide built-ins"
    assert {("merge", "median"), ("variant", "outer")} <= listed(EXAMPLE_DIST)
    only_median = listed("median")  # a plugin name selects that plugin alone
    assert ("merge", "median") in only_median and ("variant", "outer") not in only_median


@pytest.mark.slow
def test_example_median_merges_through_the_registry(venv_with_example):
    out = venv_with_example.py("""
        import torch
        from adaptkit import registry
        median = registry.get("merge", "median")
        g = torch.Generator().manual_seed(0)
        odd = [torch.randn(3, 5, generator=g) for _ in range(5)]
        got = median.merge(odd, None)
        assert got.dtype == torch.float32 and got.shape == (3, 5)
        assert torch.equal(got, torch.stack(odd).median(dim=0).values)
        even = odd[:4]
        want = torch.stack(even).quantile(0.5, dim=0)  # linear interpolation: mean of the middle two
        assert torch.allclose(median.merge(even, torch.zeros(3, 5)), want, atol=1e-6)
        a, b, c = torch.tensor([1.0, 5.0]), torch.tensor([2.0, -1.0]), torch.tensor([100.0, 0.0])
        assert median.merge([a, b, c], None).tolist() == [2.0, 0.0]
        assert median.merge([a, b], None).tolist() == [1.5, 2.0]
        print("ok")
    """)
    assert out.strip() == "ok"


@pytest.mark.slow
def test_example_outer_adapter_from_the_cli(venv_with_example, tmp_path):
    folder = tmp_path / "outer-adapter"
    tensors = _write_outer_adapter(folder, scale=0.5)
    proc = venv_with_example.cli("inspect", folder, "--json")
    assert "warning" not in proc.stderr
    report = json.loads(proc.stdout)
    assert report["kind"] == "adapter"
    assert report["format"] == "peft"
    adapter = report["adapter"]
    assert adapter["variant"] == "outer"
    assert adapter["targeted_modules"] == 3
    assert adapter["trainable_parameters"] == sum(t.numel() for t in tensors.values()) == 8 + 4 + 8 + 4 + 16 + 8
    assert adapter["rank"] == 1 and adapter["scale"] == 0.5
    assert adapter["modules"]["layers.1.mlp.up_proj"]["shape"] == [16, 8]
    text = venv_with_example.cli("inspect", folder).stdout
    assert "outer" in text and "targeted modules" in text

    out = venv_with_example.py(f"""
        import torch
        from safetensors.torch import load_file
        from adaptkit import registry
        from adaptkit.adapter import read_adapter
        adapter = read_adapter({str(folder)!r})
        stored = load_file({str(folder / "adapter_model.safetensors")!r})
        outer = registry.get("variant", "outer")
        for module in adapter.modules:
            u, v = stored[f"base_model.model.{{module}}.outer_u"], stored[f"base_model.model.{{module}}.outer_v"]
            got = outer.delta(adapter, module)
            assert got.dtype == torch.float32 and got.shape == (u.numel(), v.numel())
            assert torch.allclose(got, 0.5 * torch.outer(u, v))
        print(len(adapter.modules))
    """)
    assert out.strip() == "3"


# -- 3. the editable install of the dev environment (fast, in-process) -----------------------------
@pytest.fixture
def fresh_registry(monkeypatch):
    monkeypatch.delenv("ADAPTKIT_PLUGINS", raising=False)
    registry.reload()
    yield registry
    registry.reload()


def test_editable_install_resolves_every_entry(fresh_registry):
    import importlib.resources

    toml = Path(os.fspath(importlib.resources.files("adaptkit_plugins").joinpath("registry.toml")))
    assert toml.resolve() == (REPO / "registry.toml").resolve()
    entries = fresh_registry.entries()
    assert {(e.kind, e.name) for e in entries if e.source == registry.BUILTIN} == _builtins(REPO / "registry.toml")
    for e in entries:
        obj = fresh_registry.get(e.kind, e.name)
        assert isinstance(obj, spec.PROTOCOLS[e.kind]) and obj.name == e.name
        description, problem = fresh_registry.describe(e)
        assert problem is None, f"{e.kind} {e.name}: {problem}"
        assert description, f"{e.kind} {e.name} has no one-line description"


# -- the example's plugins in-process (fast): contracts and numbers --------------------------------
@pytest.fixture
def example_modules(monkeypatch):
    monkeypatch.syspath_prepend(str(EXAMPLE / "src"))
    import adaptkit_plugin_example.median as median
    import adaptkit_plugin_example.outer as outer

    yield median, outer
    for name in [m for m in sys.modules if m.startswith("adaptkit_plugin_example")]:
        del sys.modules[name]


def test_example_entry_points_name_real_objects(example_modules):
    median, outer = example_modules
    project = tomllib.loads((EXAMPLE / "pyproject.toml").read_text())["project"]
    assert project["name"] == EXAMPLE_DIST and "adaptkit" in project["dependencies"]
    groups = project["entry-points"]
    assert groups["adaptkit.merge"] == {"median": "adaptkit_plugin_example.median:MEDIAN"}
    assert groups["adaptkit.variant"] == {"outer": "adaptkit_plugin_example.outer:OUTER"}
    assert isinstance(median.MEDIAN, spec.MergeMethod) and median.MEDIAN.name == "median"
    assert median.MEDIAN.params == {} and median.MEDIAN.per_model == frozenset()
    assert isinstance(outer.OUTER, spec.Variant) and outer.OUTER.name == "outer"
    assert tuple(outer.OUTER.param_names) == ("outer_u", "outer_v")
    assert outer.OUTER.config_keys == frozenset({"scale"})
    for kind, name, target in [("merge", "median", groups["adaptkit.merge"]["median"]),
                               ("variant", "outer", groups["adaptkit.variant"]["outer"])]:
        description, problem = registry.describe(registry.PluginEntry(kind, name, target, EXAMPLE_SOURCE))
        assert problem is None and description


def test_example_median_numbers(example_modules):
    merge = example_modules[0].MEDIAN.merge
    a, b, c, d = (torch.tensor(v) for v in ([1.0, 5.0, -2.0], [2.0, -1.0, -2.0], [100.0, 0.0, 3.0], [3.0, 7.0, 0.0]))
    assert merge([a, b, c], None).tolist() == [2.0, 0.0, -2.0]
    assert merge([a, b, c, d], None).tolist() == [2.5, 2.5, -1.0]  # mean of the two middle values
    assert merge([a], None).tolist() == a.tolist()
    assert torch.equal(merge([a.half(), b.half(), c.half()], None), merge([a, b, c], None).float())
    from adaptkit.errors import AdaptkitError

    with pytest.raises(AdaptkitError, match="at least one"):
        merge([], None)
    with pytest.raises(AdaptkitError, match="differ in shape"):
        merge([a, torch.zeros(2)], None)
    with pytest.raises(AdaptkitError, match="no parameters"):
        merge([a, b], None, weight=1.0)


def test_example_outer_delta_and_describe(example_modules, tmp_path):
    outer = example_modules[1].OUTER
    folder = tmp_path / "outer-adapter"
    tensors = _write_outer_adapter(folder, scale=2.0)
    store = open_store(folder)
    modules: dict[str, dict[str, str]] = {}
    for key in store.keys():
        module, _, role = key.removeprefix("base_model.model.").rpartition(".")
        modules.setdefault(module, {})[role] = key
    config = json.loads((folder / "adapter_config.json").read_text())
    adapter = spec.AdapterFiles("outer", config, store, "peft", modules=modules)
    figures = outer.describe(adapter)
    assert figures["rank"] == 1 and figures["scale"] == 2.0
    assert figures["modules"]["layers.0.q_proj"]["shape"] == [8, 4]
    for module in modules:
        u, v = (tensors[f"base_model.model.{module}.{r}"] for r in ("outer_u", "outer_v"))
        assert torch.allclose(outer.delta(adapter, module), 2.0 * torch.outer(u, v))
    del config["scale"]  # default scale 1
    adapter = spec.AdapterFiles("outer", config, store, "peft", modules=modules)
    u, v = (tensors[f"base_model.model.layers.0.q_proj.{r}"] for r in ("outer_u", "outer_v"))
    assert torch.allclose(outer.delta(adapter, "layers.0.q_proj", base=torch.zeros(8, 4)), torch.outer(u, v))


# -- pins ------------------------------------------------------------------------------------------
def _pins() -> dict[str, str]:
    """constraints.txt as {canonical name: version}."""
    from packaging.utils import canonicalize_name

    pins = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, sep, version = line.partition("==")
            assert sep and version, f"constraints.txt: '{line}' is not NAME==VERSION"
            pins[canonicalize_name(name)] = version
    return pins


def test_pins_satisfy_the_package_metadata():
    """Every dependency the metadata declares (core and every extra) is pinned, within its range."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    declared = list(project["dependencies"])
    for extra in project.get("optional-dependencies", {}).values():
        declared += extra
    pins = _pins()
    for text in declared:
        req = Requirement(text)
        name = canonicalize_name(req.name)
        assert name in pins, f"{req.name} is declared in pyproject.toml but not pinned in constraints.txt"
        assert req.specifier.contains(pins[name], prereleases=True), \
            f"constraints.txt pins {req.name}=={pins[name]}, outside pyproject.toml's '{req.specifier}'"


def test_installed_versions_are_the_pinned_ones():
    """The environment the tests run in is the pinned one (a stale venv fails here, not mysteriously later)."""
    from importlib.metadata import distributions

    from packaging.utils import canonicalize_name
    from packaging.version import Version

    pins = _pins()
    for dist in distributions():
        name = canonicalize_name(dist.metadata["Name"])
        if name in pins and name != "adaptkit":
            assert Version(dist.version).public == Version(pins[name]).public, \
                f"{name} {dist.version} is installed but constraints.txt pins {pins[name]}: run `make clean test`"
