"""Prepare the dataset (`make prepare`): parse, validate, encode and split it once into typed Parquet.

    python -m jobs.prepare [--force] [--set data.name=ml-1m] [--set data.dir=data/synth/ml-25m] ...

Finds the files as training does (NCF_DATA_DIR, else data.dir, else a verified download), then writes the
prepared copy (ncf.prepared) to <data.prepared_dir>/<data.name>, or says it is still valid and reuses it.
Training, tuning and the benchmarks prepare on demand; this makes it a step of its own, and reports the time
and the peak memory (RSS) it took.
"""

from __future__ import annotations

import json
import resource
import sys

from ncf import prepared
from ncf.config import load_config, override_parser
from ncf.data import DataError, resolve_data_dir


def main(argv: list[str] | None = None) -> int:
    p = override_parser(__doc__.splitlines()[0])
    p.add_argument("--force", action="store_true", help="rebuild even when the prepared copy is still valid")
    args = p.parse_args(argv)
    config = load_config(args.overrides, preset=args.preset)
    try:
        source = resolve_data_dir(config.data)
        result = prepared.prepare(config.data, source, force=args.force)
    except DataError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    stats = json.loads((result.folder / prepared.STATS).read_text())
    peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
    action = "built" if result.built else "still valid, reused"
    print(f"{config.data.name} from {source}: {action} in {result.seconds:.1f} s, peak RSS {peak_gib:.2f} GiB")
    print(f"  {result.folder}")
    print(f"  {result.manifest['verification']}")
    print(f"  {stats['ratings']:,} ratings, {stats['users']:,} users, {stats['movies']:,} movies; split "
          f"({config.data.split.protocol}): " + ", ".join(f"{k} {v:,}" for k, v in result.manifest["sizes"].items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
