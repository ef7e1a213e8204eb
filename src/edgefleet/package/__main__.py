"""``python -m edgefleet.package [OUT]``: write the manifest's JSON Schema (``docs/manifest.schema.json``)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from edgefleet.package.manifest import manifest_json_schema


def main(argv: list[str]) -> int:
    text = json.dumps(manifest_json_schema(), indent=2, sort_keys=True) + "\n"
    if argv:
        Path(argv[0]).write_text(text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
