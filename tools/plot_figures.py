"""Draw the plots of docs/figures/ from the figures kept beside them (JSON in the benches' result
layout), so a recorded run's plot can be made again without its machine:

    python tools/plot_figures.py docs/figures/served-h200-b1879cd.json   # writes the .png beside it

Needs matplotlib (`pip install -e '.[bench]'`). The JSON names its bench by its rows' fields."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from vitserve.bench.scaling_bench import plot_scaling
from vitserve.bench.served_bench import plot_served


def main(paths: list[str]) -> int:
    for name in paths:
        path = Path(name)
        result = json.loads(path.read_text())
        plot = plot_scaling if "scaling" in result["rows"][0] else plot_served
        print(plot(result, path.with_suffix(".png")))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
