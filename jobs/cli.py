"""What every job shares on its command line: config overrides."""

from __future__ import annotations

import argparse

from ncf.config import Config, load_config


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a config value, e.g. --set model.embedding_dim=64 (repeatable)")
    return p


def config_from(args: argparse.Namespace) -> Config:
    return load_config(args.overrides)
