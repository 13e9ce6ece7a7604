"""What each kernel switch earns, from the switch candidates tuned tables record: no re-tuning.

For every table, batch size and switch, the ratio of the fastest measured layer with that
switch off (split_k = 1) to the fastest measured layer of all; 1.0 means the switch earned
nothing there. Per band of batch sizes (1-8, 16-256, 512-2048, >= 4096; a batch size between
two bands counts in the lower one) the geometric mean of the ratios. The layers with a switch
off are those the search measured (it tries switch families greedily, not every
combination): re-tuning everything else with the switch off could only find a faster one,
so a ratio overstates what the switch earns, never understates it.

    python scripts/ablation.py tuned_configs/NVIDIA_H200 [more tables or folders] [--json ablation.json]

Prints a markdown table, then the JSON (or writes it to --json).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from moetune.errors import TableError, UsageError
from moetune.export import tables_to_export
from moetune.switch_candidates import candidates_of, fastest
from moetune.tune.switch_space import OFF_VALUES, SWITCH_NAMES

# (label, smallest batch size) of each band; a band runs up to the next one's start.
BANDS = (("1-8", 1), ("16-256", 16), ("512-2048", 512), (">=4096", 4096))


def band_of(M: int) -> str:
    return [label for label, start in BANDS if M >= start][-1]


def table_ablation(path: str, table: dict) -> dict | None:
    """Per batch size, each switch's ratio (fastest with it off / fastest); None when the
    table records no switch candidates."""
    per_batch = {}
    for M, entry in table["batch_sizes"].items():
        candidates = candidates_of(entry, f"{path}: batch_sizes[{M}]")
        best = fastest(candidates)
        if best is None:
            continue
        ratios = {}
        for name in SWITCH_NAMES:
            off = fastest(c for c in candidates if getattr(c.switches, name) == OFF_VALUES[name])
            ratios[name] = None if off is None else off.layer_us / best.layer_us
        per_batch[M] = {"best_us": best.layer_us, "best": {"variant": best.variant.value,
                                                             "switches": best.switches.to_json()}, "ratios": ratios}
    if not per_batch:
        return None
    bands = {}
    for name in SWITCH_NAMES:
        bands[name] = {}
        for label, _ in BANDS:
            ratios = [row["ratios"][name] for M, row in per_batch.items()
                      if band_of(M) == label and row["ratios"][name] is not None]
            if ratios:
                bands[name][label] = {"ratio": math.exp(sum(map(math.log, ratios)) / len(ratios)),
                                      "batch_sizes": len(ratios)}
    shape = table["shape"]
    return {"table": path, "shape": f"E={shape['E']},N={shape['N']},K={shape['K']},topk={shape['topk']},"
                                         f"{shape['dtype']}", "device": table["device"]["name"],
            "bands": bands, "batch_sizes": per_batch}


def markdown(results: list[dict]) -> str:
    lines = ["| table | switch | " + " | ".join(f"M {label}" for label, _ in BANDS) + " |",
             "|---|---|" + "---|" * len(BANDS)]
    for result in results:
        for name in SWITCH_NAMES:
            cells = []
            for label, _ in BANDS:
                cell = result["bands"][name].get(label)
                cells.append(f"{cell['ratio']:.3f} ({cell['batch_sizes']})" if cell else "-")
            lines.append(f"| {result['shape']} | {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("tables", nargs="+", help="tuned tables, or folders of them")
    parser.add_argument("--json", default=None, help="write the JSON here instead of printing it")
    args = parser.parse_args()
    results = []
    try:
        tables = tables_to_export(args.tables)
        for path, table in tables:
            result = table_ablation(path, table)
            if result is None:
                print(f"skipped {path}: it records no switch candidates (tuned without the switch search)",
                      file=sys.stderr)
            else:
                results.append(result)
    except (TableError, UsageError, ValueError) as error:
        print(f"ablation.py: {error}", file=sys.stderr)
        return 2
    print("Time with the switch off (the fastest layer measured so) over the fastest layer measured; "
          "geometric mean per band of M (batch sizes in the band)\n")
    print(markdown(results))
    text = json.dumps({"bands": dict(BANDS), "tables": results}, indent=1)
    if args.json:
        Path(args.json).write_text(text + "\n")
        print(f"\nwrote {args.json}")
    else:
        print("\n" + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
