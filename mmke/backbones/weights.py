"""Checks before loading weights, so a missing checkpoint stops with what to set."""

from __future__ import annotations

from pathlib import Path

from mmke.errors import WeightsNotFoundError


def check_weights_path(path: str | None, family: str, local_files_only: bool,
                       setting: str = "backbone.path") -> str:
    """Return a loadable source or raise ``WeightsNotFoundError`` saying which setting to fix."""
    how = (f"set {setting} to a local folder holding {family} in Hugging Face layout "
           "(config.json, *.safetensors, tokenizer files, preprocessor_config.json)")
    if not path:
        raise WeightsNotFoundError(f"{setting} is not set; {how}")
    folder = Path(path).expanduser()
    if folder.is_dir():
        if not (folder / "config.json").is_file():
            raise WeightsNotFoundError(f"{folder} has no config.json; {how}")
        return str(folder)
    if local_files_only or path.startswith((".", "/", "~")):
        raise WeightsNotFoundError(
            f"no weights at {setting}={path}; {how}, or pass a hub id with "
            "backbone.local_files_only=false on a machine that can reach the hub")
    return path
