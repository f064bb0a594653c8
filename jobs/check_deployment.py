"""Offline checks of the deployment files in platform/: they must be valid and agree with conf/ and Ray.

    python -m jobs.check_deployment [--root DIR]

Each file gets one line, `ok` or `FAIL` with the problem; the exit code is 1 when any file fails.
What is checked, and where: `workflows.deployment`.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from workflows.deployment.base import REPO_ROOT
from workflows.deployment.checklist import run_checks


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=REPO_ROOT, help="repository root (default: this checkout)")
    args = parser.parse_args(argv)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    failed = run_checks(args.root.resolve())
    if failed:
        print(f"{failed} deployment file(s) failed their checks", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
