"""The README's peer-comparison tables, generated from the committed ``compare_peers`` JSON.

Each generated block of ``README.md`` sits between ``<!-- readme_tables:NAME -->`` and
``<!-- /readme_tables:NAME -->``; this script rewrites them all (one whose JSON is missing says
so):

- ``peers``: the one-point five-stack table and its targets (``compare_peers.json``), then the
  same with activation checkpointing in every stack (``compare_peers_remat.json``);
- ``curves``: tokens/s, peak RSS and MFU per stack over sequence length and model size
  (``compare_peers_curves.json``);
- ``memory``: jqlora-qlora's peak RSS broken down (baseline, weights, optimizer state, saved
  activations, XLA temporaries, allocator and the rest) at every setting that measured it.

  python benchmarks/readme_tables.py           # rewrite README.md
  python benchmarks/readme_tables.py --check   # exit 1 if README.md is not what the JSON says
"""

from __future__ import annotations

import argparse
import json
import pathlib
import re
import sys

import compare_peers

ROOT = pathlib.Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
GIB = 2.0 ** 30
BREAKDOWN = ("baseline", "weights", "optimizer_state", "saved_activations", "temporaries",
             "allocator_and_other")


def _load(name: str, results: pathlib.Path) -> dict | None:
  path = results / f"{name}.json"
  return json.loads(path.read_text()) if path.is_file() else None


def _machine(report: dict, name: str) -> str:
  m = report["machine"]
  where = m.get("gpu_name") or f"{m['cpu']}, {m['cpus']} cores, {m['memory_gib']} GiB"
  return (f"`benchmarks/compare_peers.py` → [{name}.json](benchmarks/results/{name}.json); "
          f"{where}; ISA {' '.join(m['isa_flags']) or '-'}; "
          + ", ".join(f"{k} {v}" for k, v in m["versions"].items()))


def _isa_level(machine: dict) -> str:
  """The widest vector ISA among a machine's flags (``AVX-512``, ``AVX2``, ...), to tell CPUs of one
  model name apart."""
  flags = machine["isa_flags"]
  return next((name for flag, name in (("amx_tile", "AMX"), ("avx512f", "AVX-512"), ("avx2", "AVX2"))
               if flag in flags), "no AVX2")


def _one_point(report: dict, name: str) -> list[str]:
  """A run's stack and target tables (``compare_peers._run_tables``) under its machine line."""
  lines = [f"*{_machine(report, name)}.*", ""]
  for r in report["runs"]:
    body = compare_peers._run_tables(r, report["machine"]["gpu"])
    lines += [f"**{body[0].removeprefix('## ')}**"] + body[1:]
  return lines


def peers(results: pathlib.Path) -> list[str] | None:
  """The ``peers`` block: the one-point comparison without and with checkpointing."""
  parts = [(n, _load(n, results)) for n in ("compare_peers", "compare_peers_remat")]
  if parts[0][1] is None:
    return None
  lines = []
  for name, report in parts:
    if report is not None:
      lines += _one_point(report, name)
  return lines


def curves(results: pathlib.Path) -> list[str] | None:
  """The ``curves`` block: one row per point, per stack tokens/s, peak RSS GiB and MFU."""
  report = _load("compare_peers_curves", results)
  if report is None:
    return None
  points = compare_peers.curve_points(report)
  stacks = [s for s in compare_peers.STACKS if s in points["sequence"] or s in points["model"]]
  lines = [f"*{_machine(report, 'compare_peers_curves')}; each cell tokens/s · peak RSS GiB · "
           "MFU; the 1-minute load average of every stack's run is in the JSON.*", "",
           "| point | " + " | ".join(stacks) + " |", "|---|" + "---:|" * len(stacks)]
  for key, label in (("sequence", "seq {:g}, batch x seq = " + str(report["curve_tokens"])),
                     ("model", "{:.0f}M base params, " + f"{report['curve_batch']} x 128")):
    xs = sorted({p[0] for pts in points[key].values() for p in pts})
    for x in xs:
      cells = []
      for s in stacks:
        p = next((p for p in points[key].get(s, []) if p[0] == x), None)
        cells.append("-" if p is None else f"{p[1]:.0f} · {p[2]:.2f} · {100 * p[3]:.0f}%")
      lines.append(f"| {label.format(x)} | " + " | ".join(cells) + " |")
  loads = [max(v["load_avg_1min"]) for r in report["runs"] for v in r["stacks"].values()]
  lines += ["", f"Load average over the stacks' runs: {min(loads):.1f}–{max(loads):.1f} "
            f"({report['machine']['cpus']} cores).", "",
            "![cost curves](benchmarks/results/compare_peers_curves.png)"]
  return lines


def memory(results: pathlib.Path) -> list[str] | None:
  """The ``memory`` block: jqlora-qlora's breakdown at every setting that measured it."""
  rows = []
  for name in ("compare_peers", "compare_peers_remat", "compare_peers_curves"):
    report = _load(name, results)
    for r in (report or {}).get("runs", []):
      q = r["stacks"].get("jqlora-qlora", {})
      if "memory_breakdown" in q:
        s = r["setting"]
        saves = "full" if s["remat"] else s.get("jqlora_saves", "all")
        rows.append((f"{s['model']} {s['batch']} x {s['seq']}, checkpointing {saves} "
                     f"([{name}](benchmarks/results/{name}.json), {report['machine']['cpu']} "
                     f"{_isa_level(report['machine'])})", q["memory_breakdown"]))
  if not rows:
    return None
  lines = ["| jqlora-qlora GiB | " + " | ".join(k.replace("_", " ") for k in BREAKDOWN)
           + " | peak RSS | XLA temp |", "|---|" + "---:|" * (len(BREAKDOWN) + 2)]
  for label, m in rows:
    lines.append(f"| {label} | " + " | ".join(f"{m[k] / GIB:.3f}" for k in BREAKDOWN)
                 + f" | {m['peak_rss'] / GIB:.3f} | {m['xla_temp_size'] / GIB:.3f} |")
  return lines


BLOCKS = {"peers": peers, "curves": curves, "memory": memory}
#: what writes each block's JSON, said in the block while it is missing
COMMANDS = {"peers": "python benchmarks/compare_peers.py --breakdown",
            "curves": "python benchmarks/compare_peers.py --curves --breakdown",
            "memory": "python benchmarks/compare_peers.py --breakdown"}


def render(readme: str, results: pathlib.Path = RESULTS) -> str:
  """``readme`` with every block regenerated (a block whose JSON is missing says so and what
  writes it); ValueError for a missing marker."""
  for name, build in BLOCKS.items():
    lines = build(results) or [f"*Not measured yet: `{COMMANDS[name]}` writes it.*"]
    pattern = re.compile(rf"(<!-- readme_tables:{name} -->\n).*?(<!-- /readme_tables:{name} -->)",
                         re.S)
    if not pattern.search(readme):
      raise ValueError(f"README.md has no <!-- readme_tables:{name} --> ... "
                       f"<!-- /readme_tables:{name} --> block")
    text = "\n".join(lines).rstrip("\n") + "\n"
    readme = pattern.sub(lambda m, text=text: m.group(1) + text + m.group(2), readme)
  return readme


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--check", action="store_true",
                      help="do not write; exit 1 when README.md differs from the JSON's tables")
  parser.add_argument("--readme", default=str(ROOT / "README.md"))
  args = parser.parse_args(argv)
  path = pathlib.Path(args.readme)
  old = path.read_text()
  new = render(old)
  if args.check:
    if new != old:
      print(f"{path}: the generated tables are out of date; run benchmarks/readme_tables.py",
            file=sys.stderr)
      return 1
    return 0
  path.write_text(new)
  print(f"wrote {path}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
