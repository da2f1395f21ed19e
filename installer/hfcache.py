"""Models the user already has: a local folder, or a snapshot in the Hugging Face cache.

`verify --deep` and `tune` read models from here and never download one on
their own (that takes the user's --allow-download). The cache layout is
huggingface_hub's: $HF_HUB_CACHE, else $HF_HOME/hub, else
~/.cache/huggingface/hub, with models--ORG--NAME/snapshots/<revision>/ and
refs/main naming the revision the hub's `main` pointed at.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .errors import UsageError

# Small models `verify --deep` takes when the user names none, smallest first.
# Any of them fits in 16 GB with room to spare; FP8 ones exercise the FP8 path too.
SMALL_MODELS = ("Qwen/Qwen3-0.6B-FP8", "RedHatAI/Qwen3-0.6B-FP8-dynamic", "Qwen/Qwen3-0.6B",
                "Qwen/Qwen2.5-0.5B-Instruct", "facebook/opt-125m")


# where the user keeps models and their token; the activation's env leaves them out
USER_VARS = ("HF_HOME", "HF_HUB_CACHE", "HF_TOKEN", "XDG_CACHE_HOME")


def with_user_vars(env: Mapping[str, str]) -> dict[str, str]:
    """`env` plus the caller's Hugging Face cache/token variables, so a child finds the same models."""
    return {**env, **{k: os.environ[k] for k in USER_VARS if k in os.environ}}


def hub_dir(env: Mapping[str, str] | None = None) -> Path:
    env = os.environ if env is None else env
    if env.get("HF_HUB_CACHE"):
        return Path(env["HF_HUB_CACHE"])
    if env.get("HF_HOME"):
        return Path(env["HF_HOME"]) / "hub"
    home = env.get("XDG_CACHE_HOME") or str(Path(env.get("HOME") or Path.home()) / ".cache")
    return Path(home) / "huggingface" / "hub"


def snapshot(name: str, env: Mapping[str, str] | None = None) -> Path | None:
    """The cached snapshot folder of `name` (ORG/NAME) that holds a config.json, or None."""
    repo = hub_dir(env) / ("models--" + name.replace("/", "--"))
    snaps = repo / "snapshots"
    if not snaps.is_dir():
        return None
    try:
        main = (repo / "refs" / "main").read_text().strip()
    except OSError:
        main = ""
    candidates = [snaps / main] if main else []
    candidates += sorted(snaps.iterdir(), key=lambda p: p.stat().st_mtime, reverse=True)
    return next((c for c in candidates if (c / "config.json").is_file()), None)


def locate(model: str, env: Mapping[str, str] | None = None) -> Path | None:
    """A local model folder, or the cached snapshot of a hub name; None when not on disk."""
    path = Path(model).expanduser()
    if (path / "config.json").is_file():
        return path
    return snapshot(model, env) if "/" in model and not model.startswith((".", "/", "~")) else None


def pick_for_verify(model: str | None, *, allow_download: bool,
                    env: Mapping[str, str] | None = None) -> tuple[str, str]:
    """(model to load or "", why none): the named one if on disk (or downloads are allowed),
    else the first cached SMALL_MODELS entry."""
    if model:
        if locate(model, env) is not None or allow_download:
            return model, ""
        return "", (f"{model} is neither a local folder nor in the Hugging Face cache at {hub_dir(env)}; "
                    "add --allow-download to fetch it")
    for name in SMALL_MODELS:
        if snapshot(name, env) is not None:
            return name, ""
    return "", (f"no model named and none of {', '.join(SMALL_MODELS)} cached in {hub_dir(env)}; "
                "pass --model NAME (add --allow-download to fetch it)")


def config(model: str, env: Mapping[str, str] | None = None, *, hint: str = "") -> dict[str, Any]:
    """The model's config.json (text config of a multimodal one); a usage error when not on disk."""
    where = locate(model, env)
    if where is None:
        raise UsageError(f"{model} is neither a local folder nor in the Hugging Face cache at {hub_dir(env)}",
                         hint=hint or "pass a local model folder")
    try:
        data = json.loads((where / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise UsageError(f"cannot read {where / 'config.json'}: {exc}") from None
    if not isinstance(data, dict):
        raise UsageError(f"{where / 'config.json'} is not a JSON object")
    text = data.get("text_config")
    return {**data, **text} if isinstance(text, dict) else data
