"""The family registry: every built-in family resolves by name, alias and processor class; bad
look-ups and clashing registrations are errors; a family registered from one file (here, a toy one
in this test) is picked up by VisualGrid, detect_family, from_processor and the CLI's --family with
nothing else edited; and dvsft_kernels.labeling has no import cycle."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from PIL import Image

import dvsft_kernels.labeling
from dvsft_kernels.labeling import VisualGrid, families, registry
from dvsft_kernels.labeling.registry import Family
from tests.import_graph import import_cycles

# what the CLI accepted before the registry: every name must keep resolving (in registration order,
# which is the family modules' name order)
BUILTIN = {
    "gemma3": (),
    "idefics3": ("smolvlm",),
    "internvl": (),
    "llava": (),
    "llava_next": (),
    "llava_onevision": (),
    "pixtral": ("mistral3",),
    "qwen2_vl": ("qwen2_5_vl", "qwen3_vl"),
}
BUILTIN_PROCESSORS = {
    "Qwen2VLProcessor": "qwen2_vl",
    "Qwen2_5_VLProcessor": "qwen2_vl",
    "Qwen3VLProcessor": "qwen2_vl",
    "LlavaProcessor": "llava",
    "LlavaNextProcessor": "llava_next",
    "LlavaOnevisionProcessor": "llava_onevision",
    "InternVLProcessor": "internvl",
    "Idefics3Processor": "idefics3",
    "SmolVLMProcessor": "idefics3",
    "Gemma3Processor": "gemma3",
    "PixtralProcessor": "pixtral",
}


def _instance_of(class_name: str, *bases: type):
    """An object of a class called ``class_name`` (detection goes by class names)."""
    return type(class_name, bases or (), {})()


# ------------------------------------------------------------------------------------------------
# built-in families
def test_builtin_families_in_registration_order():
    assert registry.names() == tuple(BUILTIN) == families.FAMILY_MODULES
    assert registry.names(aliases=True) == tuple(n for k, a in BUILTIN.items() for n in (k, *a))
    assert {f.name: f.aliases for f in registry.families()} == BUILTIN
    assert {c: f.name for f in registry.families() for c in f.processors} == BUILTIN_PROCESSORS
    # each family module defines its FAMILY, the one registered
    for fam in registry.families():
        assert getattr(families, fam.name).FAMILY is fam


@pytest.mark.parametrize("fam", registry.families(), ids=lambda f: f.name)
def test_every_family_resolves_by_name_alias_and_processor(fam):
    assert registry.get(fam.name) is fam
    for alias in fam.aliases:
        assert registry.get(alias) is fam
        # the spellings the CLI accepts: any case, '-' or '.' for '_'
        assert registry.get(alias.upper().replace("_", "-")) is fam
    for name in fam.processors:
        proc = _instance_of(name)
        assert registry.for_processor(proc) is fam
        assert registry.detect_family(proc) == families.detect_family(proc) == fam.name
        # subclasses of a processor class are that family too
        assert registry.detect_family(_instance_of("MyProcessor", type(proc))) == fam.name
    for name in fam.image_processors:
        for suffix in ("", "Pil", "Fast"):
            assert registry.detect_family(_instance_of(name + suffix)) == fam.name
    # the generic accessor and the builder are the same function
    assert VisualGrid.for_family(fam.name, (10, 10), *_builder_args(fam)) == fam.build(
        (10, 10), *_builder_args(fam)
    )


def _builder_args(fam: Family) -> tuple:
    return ((1, 2, 2),) if fam.name == "qwen2_vl" else ()


def test_for_name_accessors_forward_to_the_registry():
    qwen = VisualGrid.for_qwen2_vl((56, 56), (1, 4, 4))
    assert qwen == VisualGrid.for_family("qwen3-VL", (56, 56), (1, 4, 4))
    for name in ("llava", "llava_next", "llava_onevision", "internvl", "idefics3", "gemma3", "pixtral"):
        g = getattr(VisualGrid, f"for_{name}")((300, 500))
        assert g.family == name and g == VisualGrid.for_family(name, (300, 500))


def test_image_token_id_per_family():
    tok = SimpleNamespace(image_token_id=5)
    llava = _instance_of("LlavaProcessor")
    llava.image_token_id, llava.tokenizer = 3, tok
    gemma = _instance_of("Gemma3Processor")
    gemma.image_token_id, gemma.tokenizer = 4, tok  # begin-of-image; the run is the tokenizer's soft token
    assert registry.image_token_id(llava) == families.image_token_id(llava) == 3
    assert registry.image_token_id(gemma) == 5
    with pytest.raises(ValueError, match="cannot find the image token id of LlavaProcessor"):
        registry.image_token_id(_instance_of("LlavaProcessor"))


def test_qwen_default_processor_keeps_qwen3_patch():
    pytest.importorskip("transformers")
    fam = registry.get("qwen2_vl")
    assert fam.default_processor("qwen2_vl").patch_size == 14
    assert fam.default_processor("qwen3_vl").patch_size == 16
    assert all(registry.get(n).default_processor is None for n in registry.names() if n != "qwen2_vl")


# ------------------------------------------------------------------------------------------------
# errors
@pytest.mark.parametrize("bad", ["qwen9", "", "llava_nex", None, 3])
def test_unknown_family_is_a_value_error_listing_the_known(bad):
    for call in (
        lambda: registry.get(bad),
        lambda: VisualGrid.for_family(bad, (10, 10)),
    ):
        with pytest.raises(ValueError, match=rf"^family: unknown family {bad!r}; known: ") as e:
            call()
        assert all(n in str(e.value) for n in registry.names(aliases=True))
    with pytest.raises(ValueError, match=r"^--family: unknown family"):
        registry.get(bad, argument="--family")


def test_unknown_processor_is_a_type_error_listing_the_supported():
    with pytest.raises(TypeError, match="unsupported class Foo; supported processors: ") as e:
        registry.for_processor(_instance_of("Foo"))
    assert all(c in str(e.value) for c in BUILTIN_PROCESSORS)
    assert "image processors alone: Qwen2VLImageProcessor" in str(e.value)


def _noop(*a, **k):
    raise AssertionError("not called")


@pytest.mark.parametrize(
    "clash, needle",
    [
        ({"name": "llava"}, "name 'llava' is already registered (by family 'llava')"),
        ({"aliases": ("smolvlm",)}, "name 'smolvlm' is already registered (by family 'idefics3')"),
        ({"aliases": ("qwen2_5_vl",)}, "name 'qwen2_5_vl' is already registered (by family 'qwen2_vl')"),
        ({"aliases": ("new_vlm",)}, "name 'new_vlm' is already registered (by family 'new_vlm')"),
        ({"aliases": ("a1", "a1")}, "name 'a1' is already registered"),
        ({"processors": ("LlavaProcessor",)}, "processor class 'LlavaProcessor' is already registered"),
        ({"image_processors": ("Qwen2VLImageProcessor",)}, "image processor class 'Qwen2VLImageProcessor'"),
    ],
)
def test_registering_a_clash_raises_and_changes_nothing(clash, needle):
    before = (registry.names(aliases=True), registry.families())
    fam = Family(**{"name": "new_vlm", "build": _noop, "from_processor": _noop, **clash})
    with pytest.raises(ValueError, match="already registered") as e:
        registry.register(fam)
    assert needle in str(e.value)
    assert (registry.names(aliases=True), registry.families()) == before


def test_family_fields_are_checked():
    with pytest.raises(ValueError, match="normalised"):
        Family(name="Toy-VLM", build=_noop, from_processor=_noop)
    with pytest.raises(ValueError, match="normalised"):
        Family(name="toy", aliases=("Toy.2",), build=_noop, from_processor=_noop)
    with pytest.raises(ValueError, match="aliases must be a sequence"):
        Family(name="toy", aliases="toy2", build=_noop, from_processor=_noop)
    with pytest.raises(TypeError, match="build must be callable"):
        Family(name="toy", build=None, from_processor=_noop)
    with pytest.raises(TypeError, match="register"):
        registry.register("toy")
    fam = Family(name="toy", aliases=["toy2"], build=_noop, from_processor=_noop)
    assert fam.aliases == ("toy2",) and fam.names == ("toy", "toy2")
    with pytest.raises(AttributeError):
        fam.name = "other"  # frozen


# ------------------------------------------------------------------------------------------------
# a family from one file: TOY_MODULE is all a new dvsft_kernels/labeling/families/toy_vlm.py would hold
TOY_MODULE = '''"""A toy VLM: the image squashed to whole cells of ``cell`` px, one view, row-major."""

from dvsft_kernels.labeling.families.common import PixelMap, ProcessorSettings, hw, pos_int, processor_adapter
from dvsft_kernels.labeling.grid import VisualGrid
from dvsft_kernels.labeling.registry import Family, register


def toy_vlm(image_size, *, cell: int = 28) -> VisualGrid:
    H, W = hw(image_size)
    c = pos_int(cell, "cell")
    rows, cols = max(1, round(H / c)), max(1, round(W / c))
    view = PixelMap().scale(cols * c / W, rows * c / H).view(H, W, rows, cols, c, c, 0, cols, "image")
    return VisualGrid("toy_vlm", (H, W), (view,), rows * cols)


@processor_adapter
def from_processor(s: ProcessorSettings, H, W, outputs, index):
    return toy_vlm((H, W), cell=int(s("cell", 28)))


FAMILY = register(
    Family(
        name="toy_vlm",
        aliases=("toyvlm_2",),
        processors=("ToyVLMProcessor",),
        build=toy_vlm,
        from_processor=from_processor,
        description="a toy family",
    )
)
'''


class ToyVLMProcessor:
    """Stands in for a transformers processor class: the image processor holds the settings."""

    image_token_id = 7

    def __init__(self, cell: int = 28):
        self.image_processor = SimpleNamespace(cell=cell)


def _import_toy_module(d: Path) -> Family:
    """Import TOY_MODULE from a file in ``d`` (which registers its family); returns its FAMILY."""
    path = d / "toy_vlm_under_test.py"
    path.write_text(TOY_MODULE)
    spec = importlib.util.spec_from_file_location("toy_vlm_under_test", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.FAMILY


@pytest.fixture
def toy(tmp_path_factory):
    before = registry.names(aliases=True)
    fam = _import_toy_module(tmp_path_factory.mktemp("toy"))
    try:
        yield fam
    finally:
        registry.unregister(fam.name)
    assert registry.names(aliases=True) == before  # removed again, the built-ins untouched


def test_toy_family_through_visual_grid_and_detection(toy):
    assert registry.get("ToyVLM-2") is toy and registry.names()[-1] == "toy_vlm"
    g = VisualGrid.for_family("toy_vlm", (140, 280))
    assert g.family == "toy_vlm" and g.num_tokens == 50 and (g.views[0].rows, g.views[0].cols) == (5, 10)
    proc = ToyVLMProcessor(cell=14)
    assert registry.detect_family(proc) == families.detect_family(proc) == "toy_vlm"
    assert VisualGrid.from_processor(proc, (140, 280)).num_tokens == 200
    assert VisualGrid.from_processor(proc, (140, 280), images_kwargs={"cell": 70}).num_tokens == 8
    assert registry.grid_from_processor(proc, Image.new("RGB", (280, 140))).num_tokens == 200
    assert registry.image_token_id(proc) == families.image_token_id(proc) == 7
    with pytest.raises(ValueError, match="index must be a non-negative int"):
        VisualGrid.from_processor(proc, (140, 280), index=-1)


def test_toy_family_is_gone_after_the_fixture(tmp_path):
    with pytest.raises(ValueError, match="unknown family 'toy_vlm'"):
        VisualGrid.for_family("toy_vlm", (10, 10))
    with pytest.raises(TypeError, match="unsupported class ToyVLMProcessor"):
        registry.detect_family(ToyVLMProcessor())
    # the registry was restored, not left half-filled: the family registers again, here for a block
    fam = registry.unregister(_import_toy_module(tmp_path).name)
    with registry.registered(fam):
        assert registry.get("toyvlm_2") is fam
    assert "toy_vlm" not in registry.names()


def test_a_builder_must_return_a_visual_grid():
    bad = Family(name="bad_vlm", build=lambda image_size: "grid", from_processor=_noop)
    with registry.registered(bad), pytest.raises(TypeError, match="family 'bad_vlm' built a str"):
        VisualGrid.for_family("bad_vlm", (10, 10))


def test_every_module_of_the_package_is_a_registered_family():
    d = Path(families.__file__).parent
    modules = sorted(p.stem for p in d.glob("*.py") if p.stem != "common" and not p.stem.startswith("_"))
    assert families.FAMILY_MODULES == tuple(modules)
    for name in modules:  # named like its family, which it registered as FAMILY
        assert getattr(families, name).FAMILY is registry.get(name)


def test_a_new_family_is_one_new_file(tmp_path):
    """A copy of the package plus families/toy_vlm.py, nothing else edited: the CLI and VisualGrid
    know the family (in a fresh interpreter, as a user would have it)."""
    pytest.importorskip("transformers")
    pytest.importorskip("tokenizers")
    root = tmp_path / "src"
    package = Path(dvsft_kernels.__file__).parent
    shutil.copytree(package, root / "dvsft_kernels", ignore=shutil.ignore_patterns("__pycache__"))
    (root / "dvsft_kernels" / "labeling" / "families" / "toy_vlm.py").write_text(TOY_MODULE)
    tok = _tokenizer_dir(tmp_path / "tok")
    img, ocr, out = _page(tmp_path)
    code = (
        "import sys, dvsft_kernels\n"
        f"assert dvsft_kernels.__file__.startswith({str(root)!r}), dvsft_kernels.__file__\n"
        "from dvsft_kernels.labeling import VisualGrid\n"
        "assert VisualGrid.for_family('toyvlm-2', (140, 280)).num_tokens == 50\n"
        "from dvsft_kernels.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    args = ["label", str(img), str(ocr), "--family", "toy_vlm", "--tokenizer", str(tok), "--out", str(out)]
    r = subprocess.run(
        [sys.executable, "-c", code, *args],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(root)},
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert r.returncode == 0, r.stderr
    assert json.loads(out.read_text())["grid"]["family"] == "toy_vlm"


def _tokenizer_dir(d: Path) -> Path:
    tokenizers = pytest.importorskip("tokenizers")
    vocab = {"[UNK]": 0, "cat": 1, "dog": 2}
    t = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    t.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    d.mkdir()
    t.save(str(d / "tokenizer.json"))
    return d


def _page(d: Path) -> tuple[Path, Path, Path]:
    """A 280 x 140 page (5 x 10 toy cells of 28 px): "cat" on cells (1, 1), (1, 2), "dog" on (3, 5)."""
    img, ocr = d / "page.png", d / "page.json"
    Image.new("RGB", (280, 140), "white").save(img)
    words = [{"text": "cat", "box": [28, 28, 84, 56]}, {"text": "dog", "box": [140, 84, 168, 112]}]
    ocr.write_text(json.dumps(words))
    return img, ocr, d / "labels.json"


def test_toy_family_through_the_cli(toy, tmp_path, capsys):
    pytest.importorskip("transformers")
    from dvsft_kernels.cli import main

    tok = _tokenizer_dir(tmp_path / "tok")
    img, ocr, out = _page(tmp_path)
    # listed in --help, accepted by its alias in any spelling
    assert main(["label", "-h"]) == 0
    assert "toy_vlm, toyvlm_2" in " ".join(capsys.readouterr().out.split())
    args = ["label", str(img), str(ocr), "--family", "ToyVLM-2", "--tokenizer", str(tok), "--out", str(out)]
    code = main(args)
    _, err = capsys.readouterr()
    assert code == 0, err
    rec = json.loads(out.read_text())
    assert rec["grid"]["family"] == "toy_vlm" and rec["grid"]["num_tokens"] == 50
    assert {int(i): t["id"] for i, t in rec["tokens"].items()} == {11: 1, 12: 1, 35: 2}


def test_cli_rejects_a_family_not_registered(tmp_path, capsys):
    from dvsft_kernels.cli import main

    img = tmp_path / "page.png"
    Image.new("RGB", (28, 28)).save(img)
    (tmp_path / "page.json").write_text("[]")
    assert main(["label", str(img), str(tmp_path / "page.json"), "--family", "toy_vlm"]) == 2
    err = capsys.readouterr().err
    assert "--family: unknown family 'toy_vlm'; known: " + ", ".join(registry.names(aliases=True)) in err


# ------------------------------------------------------------------------------------------------
# import graph
def test_no_import_cycle_in_labeling():
    root = Path(dvsft_kernels.labeling.__file__).parent
    assert import_cycles(root, "dvsft_kernels.labeling") == []


def test_import_cycle_check_finds_one(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("from pkg import a\n")
    (pkg / "a.py").write_text("def f():\n    from pkg.sub import b\n")  # lazy imports count
    (pkg / "sub" / "__init__.py").write_text("from pkg.sub import c\n")
    (pkg / "sub" / "b.py").write_text("")
    (pkg / "sub" / "c.py").write_text("import pkg.a\n")
    # a -> pkg.sub (its __init__ runs) -> c -> a
    assert import_cycles(pkg, "pkg") == [["pkg.a", "pkg.sub", "pkg.sub.c", "pkg.a"]]
