"""Run every benchmark in this folder and print one markdown summary.

Each `bench_*.py` prints its own markdown tables. Rows of tables with `figure` and `ratio` columns are
gathered into one summary table (figure, zhllm, reference, ratio, target); every table is also reprinted
under its benchmark's name. Usage: python benchmarks/run_all.py [--quick] [--only decode,train]
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def tables(text: str) -> list[list[list[str]]]:
    """Markdown tables in `text`, each as rows of cells (header first, separator dropped)."""
    found, current = [], []
    for line in text.splitlines() + [""]:
        line = line.strip()
        if line.startswith("|") and line.endswith("|"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            if not all(set(c) <= set("-: ") for c in cells):
                current.append(cells)
        elif current:
            found.append(current)
            current = []
    return found


def summary_rows(name: str, found: list[list[list[str]]]) -> list[list[str]]:
    rows = []
    for table in found:
        header = [h.lower() for h in table[0]]
        if "figure" not in header or "ratio" not in header:
            continue
        col = {h: i for i, h in enumerate(header)}
        ref = next((h for h in header if h not in ("figure", "ratio", "target") and "zhllm" not in h), None)
        zh = next((h for h in header if "zhllm" in h), None)
        for cells in table[1:]:
            get = lambda h: cells[col[h]] if h is not None and h in col and col[h] < len(cells) else ""  # noqa: E731
            rows.append([name, get("figure"), get(zh), get(ref), get("ratio"), get("target")])
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="pass --quick to the benchmarks that have it")
    ap.add_argument("--only", default="", help="comma list of benchmark names (e.g. decode,train)")
    args = ap.parse_args()
    only = {n.strip() for n in args.only.split(",") if n.strip()}
    scripts = [p for p in sorted(HERE.glob("bench_*.py")) if not only or p.stem.removeprefix("bench_") in only]
    summary, sections = [], []
    for script in scripts:
        cmd = [sys.executable, str(script)]
        if args.quick and "--quick" in script.read_text(encoding="utf-8"):
            cmd.append("--quick")
        print(f"running {script.name} ...", file=sys.stderr, flush=True)
        t0 = time.time()
        r = subprocess.run(cmd, capture_output=True, text=True)
        took = time.time() - t0
        found = tables(r.stdout)
        if r.returncode != 0:
            sections.append(f"### {script.stem}\nfailed (exit {r.returncode}): {r.stderr.strip().splitlines()[-1:]}\n")
            continue
        summary += summary_rows(script.stem, found)
        body = "\n\n".join("\n".join("| " + " | ".join(c) + " |" for c in t) for t in found) or r.stdout[-2000:]
        sections.append(f"### {script.stem} ({took:.0f} s)\n\n{body}\n")
    print("## Benchmark summary\n")
    print("| benchmark | figure | zhllm | reference | ratio | target |")
    print("|---|---|---|---|---|---|")
    for row in summary:
        print("| " + " | ".join(row) + " |")
    print("\n## All tables\n")
    print("\n".join(sections))
    return 0


if __name__ == "__main__":
    sys.exit(main())
