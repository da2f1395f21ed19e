"""Small real recipe trees for engine and CLI tests.

Each step runs a real Python process that appends its recipe name to
PREFIX/order.log, so tests can see exactly what ran and in which order.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

PY = json.dumps(sys.executable)


def record_step(name: str, extra: str = "") -> str:
    code = (f"import os,pathlib; p=pathlib.Path(os.environ['ORDER_LOG']); "
            f"p.parent.mkdir(parents=True, exist_ok=True); "
            f"f=p.open('a'); f.write('{name}\\n'); f.close(); {extra}")
    return f'[[steps]]\nname = "record"\nrun = [{PY}, "-c", {json.dumps(code)}]\n'


def write_recipe(recipes: Path, name: str, *, depends=(), env=None, steps: str | None = None,
                 extra: str = "", version: str = "", head_extra: str = "") -> Path:
    env = env or {}
    env = {"ORDER_LOG": "{prefix}/order.log", **env}
    lines = [
        "[recipe]", f'name = "{name}"', f'description = "test recipe {name}"',
        f'version = "{version or "{" + name + ".version}"}"',
        f"depends = {json.dumps(list(depends))}", head_extra, "", "[env]",
    ]
    lines += [f"{k} = {json.dumps(v)}" for k, v in env.items()]
    text = "\n".join(lines) + "\n\n" + (steps if steps is not None else record_step(name)) + extra
    path = recipes / f"{name}.toml"
    path.write_text(text)
    return path


def six_recipes(root: Path) -> Path:
    """therock <- torch <- {triton-kernels, flash-attention} <- vllm <- activate, like the real graph."""
    recipes = root / "recipes"
    recipes.mkdir(parents=True)
    graph = {
        "therock": [], "torch": ["therock"], "triton-kernels": [],
        "flash-attention": ["torch"], "vllm": ["torch", "triton-kernels"],
        "activate": ["torch", "vllm"],
    }
    pins = []
    for name, deps in graph.items():
        write_recipe(recipes, name, depends=deps)
        pins.append(f'[{name}]\n# test pin\nversion = "1.0"\n')
    (recipes / "pins.toml").write_text("\n".join(pins))
    (root / "patches").mkdir()
    return recipes


def order(prefix: Path) -> list[str]:
    log = prefix / "order.log"
    return log.read_text().split() if log.exists() else []


def run_installer(recipes: Path, *args: str | bytes, env: dict | None = None, wrapper: tuple = (),
                  python: str = sys.executable) -> "subprocess.CompletedProcess[str]":
    """`python -m installer ARGS` from this checkout in a process of its own (so a
    traceback would show) with the recipe tree `recipes`; `wrapper` goes in front
    (e.g. unshare, setpriv)."""
    import os
    import subprocess

    repo = Path(__file__).resolve().parent.parent
    full = dict(os.environ, PYTHONPATH=str(repo), RDNA4_RECIPES_DIR=str(recipes), **(env or {}))
    return subprocess.run([*wrapper, python, "-m", "installer", *args], env=full, capture_output=True,
                          text=True, timeout=300, errors="replace")
