"""The Yocto layer: oelint-adv for each supported release, and every RDEPENDS,
DEPENDS and inherited class resolved by the layer itself or by the upstream
names in tests/data/yocto_upstream.json. Where the upstream git mirrors are on
this machine ($EDGEAGENT_OE_MIRRORS, default /work/.mirror), that list is
checked against the pinned upstream commits too."""

from __future__ import annotations

import ast
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO

import edgeagent

LAYER = REPO / "yocto" / "meta-edgeagent"
UPSTREAM = json.loads((REPO / "tests" / "data" / "yocto_upstream.json").read_text())
RELEASES = {"scarthgap": "scarthgap", "master": "wrynose"}  # layer directory -> oelint --release
NETWORK_RULE = "oelint.vars.homepageping"
MIRRORS = Path(os.environ.get("EDGEAGENT_OE_MIRRORS", "/work/.mirror"))


def layer_recipes(release: str) -> list[Path]:
    return sorted(LAYER.glob("recipes-*/*/*.bb")) + sorted((LAYER / "releases" / release).glob("recipes-*/*/*.bb"))


def parse_recipe(path: Path) -> dict[str, str]:
    """The assignments and inherits of a (simple) recipe: continuation lines
    joined, `+=` appended, `inherit` collected under "inherit"."""
    text = re.sub(r"\\\n", " ", path.read_text())
    values: dict[str, str] = {"inherit": ""}
    in_function = False
    for line in text.splitlines():
        if re.match(r"^[\w:${}-]+\s*\(\)\s*\{", line):
            in_function = True
        if in_function:
            in_function = line.strip() != "}"
            continue
        if line.startswith("inherit "):
            values["inherit"] += " " + line.split(None, 1)[1]
            continue
        m = re.match(r'^([\w:${}\[\]-]+)\s*(\+=|\?=|:=|=)\s*"(.*)"\s*$', line)
        if m:
            name, op, value = m.groups()
            values[name] = (values.get(name, "") + " " + value) if op == "+=" else value
    return values


def names(value: str) -> list[str]:
    """Package names from a DEPENDS/RDEPENDS value (version constraints dropped)."""
    return [n for n in re.sub(r"\([^)]*\)", " ", value).split()]


def pn_of(path: Path) -> str:
    return path.name.split("_")[0]


# --- oelint-adv -----------------------------------------------------------------------


@pytest.mark.parametrize("layer_release", sorted(RELEASES))
def test_oelint_adv_finds_nothing(layer_release: str) -> None:
    oelint = shutil.which("oelint-adv", path=str(Path(sys.executable).parent)) or shutil.which("oelint-adv")
    if oelint is None:
        pytest.skip("oelint-adv is not installed (it comes with `pip install -e .[dev]`) - the layer was not linted")
    files = [str(p.relative_to(LAYER)) for p in layer_recipes(layer_release)]
    files += [str(p.relative_to(LAYER)) for p in LAYER.rglob("layer.conf")]
    out = subprocess.run(
        # oelint.vars.homepageping is the one rule that goes to the network
        [oelint, "--quiet", "--relpaths", "--release", RELEASES[layer_release], "--suppress", NETWORK_RULE, *files],
        cwd=LAYER,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0 and not out.stdout.strip() and not out.stderr.strip(), out.stdout + out.stderr


# --- dependencies ----------------------------------------------------------------------------


def provided_by_layer(release: str) -> set[str]:
    return {pn_of(p) for p in layer_recipes(release)}


@pytest.mark.parametrize("release", sorted(RELEASES))
def test_every_dependency_and_class_exists_upstream_or_in_the_layer(release: str) -> None:
    upstream = UPSTREAM[release]
    known = provided_by_layer(release) | set(upstream["recipes"])
    known |= {f"python3-{p}" for p in upstream["python3_packages"]}
    missing = []
    for recipe in layer_recipes(release):
        values = parse_recipe(recipe)
        for var in ("RDEPENDS:${PN}", "RRECOMMENDS:${PN}", "DEPENDS"):
            for name in names(values.get(var, "")):
                base = name.removesuffix("-native")
                if base not in known:
                    missing.append(f"{recipe.name}: {var} {name}")
        for cls in values["inherit"].split():
            if cls not in upstream["classes"]:
                missing.append(f"{recipe.name}: inherit {cls}")
    assert not missing, f"not provided by the layer nor listed upstream for {release}: {missing}"


def agent_stdlib_imports() -> set[str]:
    modules: set[str] = set()
    for path in (REPO / "edgeagent").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                modules |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                modules.add(node.module.split(".")[0])
    return {m for m in modules if m in sys.stdlib_module_names}


@pytest.mark.parametrize("release", sorted(RELEASES))
def test_recipe_rdepends_cover_every_standard_library_module_the_agent_imports(release: str) -> None:
    mapping = UPSTREAM[release]["stdlib_modules"]
    unmapped = sorted(agent_stdlib_imports() - set(mapping))
    assert not unmapped, (
        f"the agent imports {unmapped}: find their python3-* package in python3-manifest.json of {release} "
        "and add it to tests/data/yocto_upstream.json and to the recipe's RDEPENDS"
    )
    rdepends = set(names(parse_recipe(edgeagent_recipe()).get("RDEPENDS:${PN}", "")))
    needed = {f"python3-{mapping[m]}" for m in agent_stdlib_imports()}
    assert needed <= rdepends, f"missing from RDEPENDS: {sorted(needed - rdepends)}"


def edgeagent_recipe() -> Path:
    (recipe,) = LAYER.glob("recipes-edgeagent/edgeagent/edgeagent_*.bb")
    return recipe


def test_recipe_matches_this_checkout() -> None:
    recipe = edgeagent_recipe()
    assert recipe.name == f"edgeagent_{edgeagent.__version__}.bb"
    values = parse_recipe(recipe)
    md5 = re.search(r"file://LICENSE;md5=([0-9a-f]{32})", values["LIC_FILES_CHKSUM"])
    assert md5 and md5.group(1) == hashlib.md5((REPO / "LICENSE").read_bytes()).hexdigest()
    for url in values["SRC_URI"].split():
        relative = url.split(";")[0].removeprefix("file://${EDGEAGENT_SRCDIR}/")
        assert (REPO / relative).exists(), url
    text = recipe.read_text()
    for installed in re.findall(r"\$\{S\}/(\S+)", text):
        assert (REPO / installed).is_file(), installed
    assert "pip" not in names(values.get("RDEPENDS:${PN}", ""))


def test_no_recipe_pulls_pip_onto_the_device() -> None:
    for recipe in LAYER.rglob("*.bb"):
        assert "python3-pip" not in names(parse_recipe(recipe).get("RDEPENDS:${PN}", "")), recipe


# --- the pinned upstream, where its mirrors are on this machine ----------------------------------


def upstream_tree(repo: str, commit: str) -> set[str] | None:
    git_dir = MIRRORS / repo / "repo"
    if not git_dir.is_dir() or shutil.which("git") is None:
        return None
    out = subprocess.run(
        ["git", "--git-dir", str(git_dir), "ls-tree", "-r", "--name-only", commit],
        capture_output=True,
        text=True,
        timeout=120,
    )
    return set(out.stdout.splitlines()) if out.returncode == 0 else None


@pytest.mark.parametrize("release", sorted(RELEASES))
def test_upstream_names_exist_in_the_pinned_release(release: str) -> None:
    pins = UPSTREAM[release]
    core = upstream_tree("openembedded+openembedded-core", pins["openembedded-core"])
    meta = upstream_tree("openembedded+meta-openembedded", pins["meta-openembedded"])
    if core is None or meta is None:
        pytest.skip(f"no git mirror of openembedded-core/meta-openembedded at {MIRRORS} ($EDGEAGENT_OE_MIRRORS)")
    layers = [p for p in core if p.startswith("meta/")] + [
        p for p in meta if p.startswith(("meta-oe/", "meta-python/"))
    ]
    recipes = {Path(p).name.split("_")[0].removesuffix(".bb") for p in layers if p.endswith(".bb")}
    classes = {Path(p).stem for p in layers if p.endswith(".bbclass")}
    assert set(pins["recipes"]) <= recipes, sorted(set(pins["recipes"]) - recipes)
    assert set(pins["classes"]) <= classes, sorted(set(pins["classes"]) - classes)
    # Recipes the layer ships must not shadow upstream ones of the same release.
    assert not provided_by_layer(release) & recipes, sorted(provided_by_layer(release) & recipes)
    manifest_path = "meta/recipes-devtools/python/python3/python3-manifest.json"
    core_git = str(MIRRORS / "openembedded+openembedded-core" / "repo")
    manifest_text = subprocess.run(
        ["git", "--git-dir", core_git, "show", f"{pins['openembedded-core']}:{manifest_path}"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    manifest = json.loads("\n".join(line for line in manifest_text.splitlines() if not line.lstrip().startswith("#")))
    assert set(pins["python3_packages"]) <= set(manifest), sorted(set(pins["python3_packages"]) - set(manifest))
    for module, package in pins["stdlib_modules"].items():
        files = manifest[package]["files"]
        # Modules built into the interpreter (sys, errno, itertools, ...) are in libpython: python3-core.
        assert module in sys.builtin_module_names or any(
            re.search(rf"/{re.escape(module)}(\.py|/|\..*so)?$", f) for f in files
        ), f"{module} is not in python3-{package} of {release}"
