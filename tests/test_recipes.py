from pathlib import Path

import pytest

from installer import recipes as rcp
from installer.errors import RecipeError, UsageError


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / f"{name}.toml"
    path.write_text(text)
    return path


def test_loads_every_section(tmp_path):
    path = write(tmp_path, "vllm", '''
[recipe]
name = "vllm"
version = "{vllm.version}"
depends = ["torch"]
patches = ["0001-a.patch"]
[source]
kind = "git"
url = "https://github.com/vllm-project/vllm"
tag = "v0.33.0"
commit = "0123456789abcdef0123456789abcdef01234567"
[env]
VLLM_TARGET_DEVICE = "rocm"
[[steps]]
name = "build"
run = ["{python}", "-m", "build"]
[[steps]]
action = "apply-patches"
with = { strict = true }
when = { "flash-attention.backend" = "ck" }
[check]
run = ["{python}", "-c", "import vllm"]
''')
    r = rcp.load_recipe(path)
    assert r.depends == ("torch",)
    assert r.source.kind == "git" and r.source.tag == "v0.33.0"
    assert r.patches == ("0001-a.patch",)
    assert dict(r.env) == {"VLLM_TARGET_DEVICE": "rocm"}
    assert r.steps[0].run == ("{python}", "-m", "build")
    assert r.steps[1].action == "apply-patches" and dict(r.steps[1].args) == {"strict": True}
    assert r.steps[1].when == (("flash-attention.backend", "ck"),)
    assert r.check.run[-1] == "import vllm"


@pytest.mark.parametrize("text, words", [
    ('[recipe]\nname = "x"\nflavour = 1\n', ["unknown key 'flavour'", "x.toml"]),
    ('[recipe]\ndescription = "no name"\n', ["missing required key 'name'"]),
    ('[recipe]\nname = "x"\n[[steps]]\nrun = "make all"\n', ["argv list, not a shell string"]),
    ('[recipe]\nname = "x"\n[[steps]]\nname = "nothing"\n', ["exactly one of 'run'"]),
    ('[recipe]\nname = "x"\n[source]\nkind = "git"\nurl = "u"\n', ["missing required key 'commit'"]),
    ('[recipe]\nname = "x"\n[source]\nkind = "ftp"\nurl = "u"\n', ["kind must be one of"]),
    ('[recipe]\nname = "y"\n', ["must match the file name"]),
    ('[recipe]\nname = "../x"\n', ["lowercase letters"]),
    ('[recipe\nname = "x"\n', ["not valid TOML"]),
    ('[recipe]\nname = "x"\n[env]\nN = 3\n', ["[env] N", "must be str"]),
])
def test_malformed_recipes_name_file_and_key(tmp_path, text, words):
    path = write(tmp_path, "x", text)
    with pytest.raises(RecipeError) as info:
        rcp.load_recipe(path)
    for word in words:
        assert word in info.value.message
    assert str(path) in info.value.message


def test_unknown_dependency_is_rejected(tmp_path):
    write(tmp_path, "a", '[recipe]\nname = "a"\ndepends = ["ghost"]\n')
    with pytest.raises(RecipeError, match="unknown recipe 'ghost'"):
        rcp.load_recipes(tmp_path)


def test_overrides_from_set_and_pins_file(tmp_path):
    pins = {"vllm": {"version": "0.33.0", "sdist_sha256": "aa"}, "torch": {"python": "3.12"}}
    user = tmp_path / "mine.toml"
    user.write_text('[torch]\npython = "3.11"\n')
    out = rcp.apply_overrides(pins, pins_file=user, sets=("vllm.version=0.33.1",))
    assert out["vllm"]["version"] == "0.33.1" and out["torch"]["python"] == "3.11"
    assert pins["vllm"]["version"] == "0.33.0", "the loaded pins are not modified"


@pytest.mark.parametrize("item", ["vllm.colour=1", "nope.version=1", "vllm=1", "version"])
def test_bad_set_key_is_a_usage_error(item):
    with pytest.raises(UsageError) as info:
        rcp.apply_overrides({"vllm": {"version": "1"}}, sets=(item,))
    assert info.value.exit_code == 2
    assert info.value.hint


def test_bad_key_in_pins_file(tmp_path):
    user = tmp_path / "mine.toml"
    user.write_text('[vllm]\nversoin = "1"\n')
    with pytest.raises(UsageError, match="unknown pin 'vllm.versoin'"):
        rcp.apply_overrides({"vllm": {"version": "1"}}, pins_file=user)


def test_interpolation():
    v = {"vllm.version": "0.33.0", "prefix": "/p q"}
    assert rcp.interpolate(["{prefix}/x", "v{vllm.version}", "{{literal}}"], v, "w") == \
        ["/p q/x", "v0.33.0", "{literal}"]
    with pytest.raises(RecipeError, match=r"unknown placeholder \{nope\}"):
        rcp.interpolate("{nope}", v, "w")
    assert rcp.placeholders({"a": ["{x.y}", "{{z}}"], "b": "{prefix}"}) == {"x.y", "prefix"}


def test_shipped_recipes_and_pins_load():
    folder = rcp.default_recipes_dir()
    recipes = rcp.load_recipes(folder)
    pins = rcp.load_pins(folder / rcp.PINS_FILE)
    for name in ("therock", "torch", "flash-attention", "vllm", "activate"):
        assert name in recipes, f"recipes/{name}.toml is missing"
    variables = rcp.pin_vars(pins)
    for recipe in recipes.values():
        for key in rcp.placeholders(recipe.raw):
            if "." in key:
                assert key in variables or recipe.resolver, f"{recipe.path}: pin {key} not in pins.toml"
