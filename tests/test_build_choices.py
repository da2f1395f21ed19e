"""Plan-level build choices: the host-compiler pin and the backend's submodules.

Real recipes and pins, a fresh prefix, no network (the derived pins given exactly)."""

from __future__ import annotations

from pathlib import Path

from installer import plan
from pins_fixtures import write_exact_pins
from installer import recipes as rcp


def _plan(tmp_path: Path, *sets: str) -> plan.Plan:
    folder = rcp.default_recipes_dir()
    pins = rcp.apply_overrides(rcp.load_pins(folder / rcp.PINS_FILE), sets=sets,
                               pins_file=write_exact_pins(tmp_path))
    return plan.make_plan(plan.Settings(prefix=tmp_path / "p", cache_dir=tmp_path / "c", recipes_dir=folder,
                                        archs=("gfx1201",), pins=pins))


def _item(p: plan.Plan, name: str) -> plan.Item:
    return next(i for i in p.items if i.name == name)


def _fetched_submodules(item: plan.Item) -> list[str]:
    """The submodules of every fetch-git step that runs with these pins."""
    out = []
    for step in item.recipe.steps:
        if step.action == "fetch-git" and not rcp.unmet(step.when, item.vars, "test"):
            out += rcp.interpolate(dict(step.args), item.vars, "test").get("submodules", [])
    return out


def test_the_host_compiler_pin_is_in_the_fingerprint_of_every_compiled_recipe(tmp_path, exact_pins):
    default, switched = _plan(tmp_path), _plan(tmp_path, "build.host_compiler=toolchain")
    for name in ("vllm", "flash-attention"):
        assert _item(default, name).inputs["pins"]["build.host_compiler"] == "system"
        assert _item(switched, name).inputs["pins"]["build.host_compiler"] == "toolchain"
        assert _item(default, name).fingerprint != _item(switched, name).fingerprint, name
    # nothing that compiles no host code moves
    for name in ("therock", "torch"):
        assert _item(default, name).fingerprint == _item(switched, name).fingerprint


def test_a_ck_plan_fetches_ck_and_no_aiter_and_triton_the_reverse(tmp_path, exact_pins):
    assert _fetched_submodules(_item(_plan(tmp_path), "flash-attention")) == ["csrc/composable_kernel"]
    triton = _item(_plan(tmp_path, "flash-attention.backend=triton"), "flash-attention")
    assert _fetched_submodules(triton) == ["third_party/aiter"]


def test_the_host_compiler_hint_is_a_command_that_works(tmp_path, exact_pins):
    from click.testing import CliRunner

    from installer import buildenv
    from installer.cli import cli

    command = buildenv.HOST_COMPILER_HINT.rsplit(": ", 1)[1].split()
    assert command[:2] == ["rdna4-install", "install"]
    result = CliRunner().invoke(cli, [*command[1:], "--dry-run", "--gpu-arch", "gfx1201",
                                      "--prefix", str(tmp_path / "p"), "--cache-dir", str(tmp_path / "c")])
    assert result.exit_code == 0, result.output
    assert "will run" in result.output
