"""Where the config's YAML files are, and how a preset layers over the defaults they hold.

The defaults travel with the code: a source checkout reads `conf/` beside `ncf/`; an installed package
(`pip install .`, a cluster image) reads the copy shipped inside it as package data (`ncf/conf/`).
`NCF_CONF_DIR` points at another folder. `ncf.config` validates what these files hold.
"""

from __future__ import annotations

import os
from pathlib import Path

import yaml

from ncf.config_migration import with_current_keys

PACKAGE_DIR = Path(__file__).resolve().parent
PRESETS_DIR = "presets"
EXTENDS = "extends"  # a preset's key naming the preset whose values it starts from


class ConfigError(ValueError):
    """A config file or override is invalid; the message names the key."""


def default_conf_dir() -> Path:
    """`NCF_CONF_DIR`, else the defaults shipped inside the installed package, else the checkout's `conf/`."""
    if os.environ.get("NCF_CONF_DIR"):
        return Path(os.environ["NCF_CONF_DIR"]).expanduser()
    shipped = PACKAGE_DIR / "conf"
    return shipped if shipped.is_dir() else PACKAGE_DIR.parent / "conf"


def preset_names(conf_dir: Path | None = None) -> list[str]:
    return sorted(p.stem for p in (Path(conf_dir or default_conf_dir()) / PRESETS_DIR).glob("*.yaml"))


def read_defaults(sections: tuple[str, ...], conf_dir: Path | None = None, preset: str | None = None) -> dict:
    """The unvalidated config tree: each of `sections` from `<conf_dir>/<section>.yaml`, then, with `preset`,
    `<conf_dir>/presets/<preset>.yaml`'s values over them (the tree records the preset's name)."""
    conf_dir = Path(conf_dir or default_conf_dir())
    tree = with_current_keys({section: _read_yaml(conf_dir / f"{section}.yaml", f"section '{section}'") or {}
                              for section in sections})
    if preset:
        for name, layer in _preset_layers(conf_dir, preset):
            _merge(tree, with_current_keys(layer), f"(preset {name}) ")
        tree["preset"] = preset
    return tree


def _preset_layers(conf_dir: Path, preset: str) -> list[tuple[str, dict]]:
    """The layers of `preset`, first the one it `extends` (a preset's own key naming another preset), if any."""
    layers: list[tuple[str, dict]] = []
    while preset:
        path = conf_dir / PRESETS_DIR / f"{preset}.yaml"
        if not path.exists():
            raise ConfigError(f"unknown preset '{preset}': no {path} (presets: {', '.join(preset_names(conf_dir))})")
        layer = _read_yaml(path, f"preset '{preset}'") or {}
        if not isinstance(layer, dict):
            raise ConfigError(f"{path} must map sections to values")
        layer = dict(layer)
        base = layer.pop(EXTENDS, None)
        if base in {name for name, _ in layers} | {preset}:
            raise ConfigError(f"preset '{preset}' extends '{base}', which extends it back")
        layers.insert(0, (preset, layer))
        preset = base
    return layers


def _merge(tree: dict, layer: dict, where: str) -> None:
    """`layer`'s values over `tree`'s, section by section; a key `tree` lacks is an error naming it."""
    for key, value in layer.items():
        if key not in tree:
            raise ConfigError(f"unknown config key '{where}{key}'")
        if isinstance(value, dict) and isinstance(tree[key], dict) and key != "space":
            _merge(tree[key], value, f"{where}{key}.")
        else:
            tree[key] = value


def _read_yaml(path: Path, what: str) -> object:
    if not path.exists():
        raise ConfigError(f"missing config file {path} ({what})")
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{path} is not valid YAML: {err}") from None
