"""Every policy x pipeline x workload x seed on the simulator (issue #9; `sair bench`).

    .venv/bin/python bench/policies.py [--quick] [--jobs N] [--out DIR] [...]

A thin wrapper around `sair.sim.grid.main` (options there): writes DIR/results.json,
DIR/results.md and DIR/plots/*.png, and prints one JSON summary as its last line (runs,
wall_s, cells, sair_best_p99, sair_best_cost, sair_best_both, sair_burst_p99_over_hpa).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sair.sim.grid import main

if __name__ == "__main__":
    raise SystemExit(main())
