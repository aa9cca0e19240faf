"""Where jqlora's QLoRA train step spends its time and memory on this machine, and what the levers give.

The model is ``compare_peers``' jqlora-qlora stack: the embedded SmolLM2-135M GGUF
(``jqlora.load_model(quantize=True)``: NF4 block 64, double quant), LoRA r=16, alpha=32 on
every decoder linear, AdamW, float32, a fixed random batch. The step is
``jqlora.training.functional_step`` under ``jax.jit`` with the states donated.

Each variant is a lever: an XLA flag, the allocator (``LD_PRELOAD`` of Debian's jemalloc or
tcmalloc, glibc's ``hugetlb`` tunable), a backend order ``$JQLORA_BACKEND``, the compute dtype,
checkpointing and its policy, the chunked loss, the batch shape. Variants that share their
process environment and batch shape run in one process with their steps interleaved (so that
each sees the same load); the others in processes of their own. Each reports: the median step
time over ``--steps`` steps after a warm-up, tokens/s, the ratio to the first variant, peak RSS
of the training phase, XLA's temporary buffer size, the model FLOPs per step
(``compare_peers.model_flops``), the dense float32 matmul throughput measured in the same
process (``[B*T, hidden] @ [hidden, intermediate]``, compare_peers' calibration shape) and the
CPU "MFU" (FLOPs per second over that throughput), and the 1-minute load average at its start
and end. With ``--profile`` (the default for the variants in ``PROFILED``) one step is traced
with ``jax.profiler``: every XLA thunk event (``hlo_op``) is timed (self time, nested events
subtracted) and put in a category by the optimized HLO it runs (the called fusion's instructions
and the source files of their stack frames): NF4 decode, matmul (dot), attention, softmax +
cross-entropy, elementwise, copies/transposes, optimizer, other.

  python benchmarks/profile_step.py                       # the default variants, 6 steps each
  python benchmarks/profile_step.py --variants qlora,lora --steps 4
  python benchmarks/profile_step.py --list                # the variants and what each changes

The machine may be shared: the load average is recorded per variant; ratios between
variants run minutes apart are only as good as the load was steady.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import glob
import json
import os
import pathlib
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).parent))

from compare_peers import Setting, model_flops
from machine import machine_info


@dataclasses.dataclass(frozen=True)
class Variant:
  """One lever setting: environment, model settings, batch shape."""

  help: str
  env: tuple[tuple[str, str], ...] = ()
  quantize: bool = True
  dtype: str = "float32"
  remat: bool | str = False
  policy: str | None = None  # a jax.checkpoint_policies name, with remat
  loss_chunk: int | None = None
  batch: int = 4
  seq: int = 128


JEMALLOC = "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"
TCMALLOC = "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4"
VARIANTS = {
    "qlora": Variant("the default: NF4 base, XLA decode + dot (nf4_matmul 'xla'), einsum attention"),
    "lora": Variant("float base (load_model(quantize=False))", quantize=False),
    "qlora-native": Variant("NF4 decoded by the C kernel, then XLA's dot",
                            env=(("JQLORA_BACKEND", "native,einsum"),)),
    "qlora-sdpa": Variant("attention by jax.nn.dot_product_attention (XLA)",
                          env=(("JQLORA_BACKEND", "xla"),)),
    "qlora-blockwise": Variant("blockwise (memory-efficient) attention, one block at 128",
                               env=(("JQLORA_BACKEND", "blockwise,xla"),)),
    "qlora-bf16": Variant("bfloat16 compute (adapters float32)", dtype="bfloat16"),
    "qlora-no-ynn": Variant("XLA's YNNPACK fusions off (Eigen/XLA dots)",
                            env=(("XLA_FLAGS", "--xla_cpu_experimental_ynn_fusion_type="),)),
    "qlora-onednn": Variant("XLA's oneDNN rewrites on",
                            env=(("XLA_FLAGS", "--xla_cpu_use_onednn=true"),)),
    "qlora-fastmath": Variant("XLA CPU fast math",
                              env=(("XLA_FLAGS", "--xla_cpu_enable_fast_math=true"),)),
    "qlora-xnn-greedy": Variant("XNNPACK graph fusion (greedy)",
                                env=(("XLA_FLAGS", "--xla_cpu_experimental_xnn_graph_fusion_mode="
                                      "XNN_GRAPH_FUSION_MODE_GREEDY"),)),
    "qlora-jemalloc": Variant("jemalloc (Debian's libjemalloc2) instead of glibc malloc",
                              env=(("LD_PRELOAD", JEMALLOC),)),
    "qlora-tcmalloc": Variant("tcmalloc (Debian's libtcmalloc-minimal4) instead of glibc malloc",
                              env=(("LD_PRELOAD", TCMALLOC),)),
    "qlora-thp": Variant("glibc malloc advising its mmapped blocks onto transparent huge pages",
                         env=(("GLIBC_TUNABLES", "glibc.malloc.hugetlb=1"),)),
    "lora-jemalloc": Variant("float base, jemalloc", quantize=False,
                             env=(("LD_PRELOAD", JEMALLOC),)),
    "qlora-chunk256": Variant("chunked LM-head loss, 256 tokens", loss_chunk=256),
    "qlora-remat": Variant("per-layer checkpointing (recompute everything)", remat=True),
    "qlora-selective": Variant("checkpointing that saves the projections, attention output and "
                               "mid-layer residual; recomputes norms, RoPE, softmax, SwiGLU",
                               remat="selective"),
    "lora-selective": Variant("float base, selective checkpointing", quantize=False,
                              remat="selective"),
    "qlora-remat-dots": Variant("checkpointing saving dots without batch dims", remat=True,
                                policy="dots_with_no_batch_dims_saveable"),
    "qlora-2048": Variant("1 x 2048, einsum attention", batch=1, seq=2048,
                          env=(("JQLORA_BACKEND", "einsum,xla"),)),
    "qlora-2048-blockwise": Variant("1 x 2048, blockwise attention (the CPU default for S > 512)",
                                    batch=1, seq=2048, env=(("JQLORA_BACKEND", "blockwise,xla"),)),
    "qlora-2048-selective": Variant("1 x 2048, blockwise attention, selective checkpointing",
                                    batch=1, seq=2048, remat="selective",
                                    env=(("JQLORA_BACKEND", "blockwise,xla"),)),
}
DEFAULT = ("qlora", "lora", "qlora-selective", "lora-selective", "qlora-remat", "qlora-native",
           "qlora-sdpa", "qlora-bf16", "qlora-no-ynn", "qlora-chunk256", "qlora-jemalloc",
           "qlora-tcmalloc", "qlora-thp")
PROFILED = ("qlora", "lora")
CATEGORIES = ("NF4 decode", "matmul (dot)", "matmul + fused NF4 decode", "attention",
              "softmax + cross-entropy", "elementwise", "copies/transposes", "optimizer", "other")


# -- the child: one variant -----------------------------------------------------------

def _peak_rss() -> int:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _patch_policy(policy: str | None) -> None:
  """``model.remat`` with a checkpoint policy: ``jqlora.models.llama``'s ``jax.checkpoint(body)``
  gets ``policy=jax.checkpoint_policies.<policy>`` (measures a proposal for that file); None
  restores it."""
  import jax

  import jqlora.models.llama as llama

  if policy is None:
    llama.jax = jax
    return

  class _Jax:
    def __getattr__(self, name):
      return getattr(jax, name)

    @staticmethod
    def checkpoint(fn, **kwargs):
      return jax.checkpoint(fn, policy=getattr(jax.checkpoint_policies, policy), **kwargs)

  llama.jax = _Jax()


def _calibrate(m: int, k: int, n: int, repeats: int = 8) -> dict:
  """Dense float32 (and bfloat16) matmul throughput of ``[m, k] @ [k, n]`` here, FLOP/s."""
  import jax
  import jax.numpy as jnp
  import numpy as np

  out = {"shape": [m, k, n]}
  rng = np.random.default_rng(0)
  for dtype in ("float32", "bfloat16"):
    a = jnp.asarray(rng.standard_normal((m, k)), dtype)
    b = jnp.asarray(rng.standard_normal((k, n)), dtype)
    mm = jax.jit(jnp.matmul)
    mm(a, b).block_until_ready()
    times = []
    for _ in range(repeats):
      start = time.perf_counter()
      mm(a, b).block_until_ready()
      times.append(time.perf_counter() - start)
    out[f"{dtype}_flop_per_s"] = 2 * m * k * n / statistics.median(times)
  return out


def _build(name: str) -> dict:
  """Loads and adapts the model of variant ``name``, compiles its step: the pieces to run it."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  import optax
  from flax import nnx

  import jqlora
  from jqlora.ops.registry import ENV_VAR
  from jqlora.training import functional_step

  v = VARIANTS[name]
  backend = dict(v.env).get(ENV_VAR)
  os.environ.pop(ENV_VAR, None)
  if backend:
    os.environ[ENV_VAR] = backend  # read when the step is traced, below
  _patch_policy(v.policy)
  s = Setting("SmolLM2-135M", batch=v.batch, seq=v.seq, steps=0, warmup=0, remat=v.remat)
  model = jqlora.load_model(jqlora.DEFAULT_MODEL, quantize=v.quantize, dtype=jnp.dtype(v.dtype),
                            progress=False)
  jqlora.apply_lora(model, jqlora.LoraConfig(r=s.r, alpha=s.alpha, target_modules="all-linear"),
                    rngs=nnx.Rngs(s.seed))
  model.remat = v.remat
  model.loss_chunk_size = v.loss_chunk
  tx = optax.adamw(s.lr, b1=s.betas[0], b2=s.betas[1], eps=s.eps, weight_decay=s.weight_decay)
  optimizer = jqlora.make_optimizer(model, tx)
  c = dataclasses.asdict(model.config)
  ids = np.random.default_rng(s.seed + 1).integers(0, c["vocab_size"], (s.batch, s.seq), np.int32)
  batch = {"input_ids": jnp.asarray(ids), "labels": jnp.asarray(ids)}
  step, state, opt_state = functional_step(model, optimizer)
  start = time.perf_counter()
  compiled = jax.jit(step, donate_argnums=(0, 1)).lower(state, opt_state, batch).compile()
  compile_s = time.perf_counter() - start
  os.environ.pop(ENV_VAR, None)
  _patch_policy(None)
  analysis = compiled.memory_analysis()
  return {"name": name, "v": v, "s": s, "config": c, "compiled": compiled, "state": state,
          "opt_state": opt_state, "batch": batch, "times": [], "losses": [],
          "result": {"variant": name, "help": v.help, "env": dict(v.env), "batch": s.batch,
                     "seq": s.seq, "dtype": v.dtype, "quantize": v.quantize, "remat": v.remat,
                     "policy": v.policy, "loss_chunk": v.loss_chunk, "compile_s": compile_s,
                     "xla_temp_bytes": analysis.temp_size_in_bytes,
                     "xla_argument_bytes": analysis.argument_size_in_bytes}}


def _one_step(run: dict) -> None:
  start = time.perf_counter()
  run["state"], run["opt_state"], metrics = run["compiled"](run["state"], run["opt_state"],
                                                            run["batch"])
  run["losses"].append(float(metrics["loss"]))  # float() waits for the step
  run["times"].append(time.perf_counter() - start)


def run_group(names: list[str], steps: int, profiled: set[str], trace_dir: str) -> list[dict]:
  """Compiles every variant of ``names`` (one process: same XLA flags), then runs their steps
  interleaved (round robin, so that each sees the same load), then profiles and calibrates."""
  loads = [os.getloadavg()[0]]
  runs = [_build(n) for n in names]
  loads.append(os.getloadavg()[0])
  for run in runs:
    _one_step(run)  # warm-up
  for i in range(steps):
    for run in runs:
      if i < (steps if run["s"].seq * run["s"].batch <= 1024 else min(steps, 3)):
        _one_step(run)
  loads.append(os.getloadavg()[0])
  out = []
  for run in runs:
    r, s, c = run["result"], run["s"], run["config"]
    median = statistics.median(run["times"][1:])
    flops = model_flops(c, s)
    r.update(step_seconds=run["times"], losses=run["losses"], median_step_s=median,
             tokens_per_s=s.batch * s.seq / median, model_flops=flops,
             load_average_build_run=loads)
    if run["name"] in profiled:
      r["profile"] = _profile(run["compiled"], run["state"], run["opt_state"], run["batch"],
                              f"{trace_dir}/{run['name']}")
    r["calibration"] = _calibrate(s.batch * s.seq, c["hidden_size"], c["intermediate_size"])
    r["mfu"] = flops["total"] / median / r["calibration"]["float32_flop_per_s"]
    out.append(r)
  peak = _peak_rss()
  for r in out:
    r["process_peak_rss_bytes"] = peak
    r["load_average"] = [loads[0], os.getloadavg()[0]]
  return out


# -- the profile -----------------------------------------------------------------------

_INSTR = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = (\S+) ([\w\-]+)\(")
_COMP = re.compile(r"^(?:ENTRY )?%([\w.\-]+) ")
_CALLS = re.compile(r"(?:calls|to_apply|body|condition|branch_computations)=\{?([%\w.\-, ]+)\}?")
_FRAME = re.compile(r"stack_frame_id=(\d+)")
_TARGET = re.compile(r'custom_call_target="([^"]+)"')


def _parse_hlo(text: str):
  """Optimized HLO text -> ``(instructions, computations, frames)``.

  ``instructions[name] = (opcode, type, callees, stack_frame_id, custom_call_target, computation)``;
  ``computations[name] = [instruction names]``; ``frames[id] = (file, parent id)``.
  """
  instrs, comps, current = {}, collections.defaultdict(list), None
  files, functions, locations, frames = {}, {}, {}, {}
  section = None
  for line in text.splitlines():
    stripped = line.strip()
    if stripped in ("FileNames", "FunctionNames", "FileLocations", "StackFrames"):
      section = stripped
      continue
    if section and re.match(r"^\d+ ", stripped):
      key, _, rest = stripped.partition(" ")
      if section == "FileNames":
        files[int(key)] = rest.strip('"')
      elif section == "FunctionNames":
        functions[int(key)] = rest.strip('"')
      elif section == "FileLocations":
        fid = re.search(r"file_name_id=(\d+)", rest)
        locations[int(key)] = files.get(int(fid.group(1)), "") if fid else ""
      else:
        loc = re.search(r"file_location_id=(\d+)", rest)
        parent = re.search(r"parent_frame_id=(\d+)", rest)
        frames[int(key)] = (locations.get(int(loc.group(1)), "") if loc else "",
                            int(parent.group(1)) if parent else 0)
      continue
    if not stripped:
      continue
    section = None
    m = _COMP.match(line)
    if m and not line.startswith(" "):
      current = m.group(1)
      continue
    m = _INSTR.match(line)
    if m:
      callees = []
      for group in _CALLS.findall(line):
        callees += [c.strip().lstrip("%") for c in group.split(",") if c.strip()]
      frame = _FRAME.search(line)
      target = _TARGET.search(line)
      instrs[m.group(1)] = (m.group(3), m.group(2), callees, int(frame.group(1)) if frame else 0,
                            target.group(1) if target else "", current)
      comps[current].append(m.group(1))
  return instrs, comps, frames


def _files(frames: dict, frame: int) -> set[str]:
  out, seen = set(), set()
  while frame and frame not in seen:
    seen.add(frame)
    file, parent = frames.get(frame, ("", 0))
    out.add(file)
    if parent == frame:
      break
    frame = parent
  return out


def _leaves(instrs, comps, name, depth=0):
  """Every instruction run by ``name``, through the computations it calls."""
  op = instrs.get(name)
  if op is None or depth > 8:
    return []
  out = [name]
  for callee in op[2]:
    for inner in comps.get(callee, []):
      out += _leaves(instrs, comps, inner, depth + 1)
  return out


_MOVES = {"copy", "transpose", "bitcast", "broadcast", "slice", "dynamic-slice",
          "dynamic-update-slice", "concatenate", "reshape", "parameter", "tuple",
          "get-tuple-element", "pad", "constant", "iota", "reverse", "gather", "scatter", "select",
          "bitcast-convert", "copy-start", "copy-done"}
_CONTAINERS = {"while", "conditional", "call"}


_COPY_NAMES = ("wrapped_broadcast", "wrapped_copy", "wrapped_transpose", "wrapped_slice",
               "wrapped_concatenate", "copy", "transpose", "dynamic-slice", "dynamic-update-slice",
               "bitcast_dynamic-update-slice", "bitcast_slice", "slice", "concatenate", "pad",
               "bitcast_copy", "broadcast")


def _category(instrs, comps, frames, name: str) -> str:
  """The category of a thunk: by the dots and NF4 codes (uint8) it runs, then by where the op
  (XLA names a fusion's frame after its root) comes from, then by what it does."""
  op = instrs.get(name)
  if op is None:
    return "other"
  ops = _leaves(instrs, comps, name)
  opcodes = {instrs[o][0] for o in ops}
  decode = (any(instrs[o][1].startswith("u8") and instrs[o][0] != "parameter" for o in ops)
            or any("nf4" in instrs[o][4] for o in ops))
  if opcodes & {"dot", "convolution"}:
    dots = [o for o in ops if instrs[o][0] in ("dot", "convolution")]
    if any(any("ops/attention" in f for f in _files(frames, instrs[o][3])) for o in dots):
      return "attention"
    return "matmul + fused NF4 decode" if decode else "matmul (dot)"
  if decode:
    return "NF4 decode"
  if op[0] in _CONTAINERS:
    return "other"
  if op[0] in _MOVES or opcodes <= _MOVES or name.startswith(_COPY_NAMES):
    return "copies/transposes"
  files = _files(frames, op[3])
  in_file = lambda part: any(part in f for f in files)
  if in_file("ops/attention"):
    return "attention"
  if in_file("optax/losses") or in_file("training/step") and opcodes & {"exponential", "log"}:
    return "softmax + cross-entropy"
  if in_file("optax/") or in_file("training/optim"):
    return "optimizer"
  return "elementwise"


def _describe(instrs, comps, frames, name: str) -> dict:
  """An op's opcode, the opcodes it runs and the project/optax source files of its frames."""
  if name not in instrs:
    return {"opcode": "?"}
  ops = _leaves(instrs, comps, name)
  files = set().union(*(_files(frames, instrs[o][3]) for o in ops))
  short = sorted({f.split("site-packages/")[-1].split("/main/")[-1] for f in files
                  if "jqlora" in f or "optax" in f or "flax" in f})
  return {"opcode": instrs[name][0], "shape": instrs[name][1][:80],
          "runs": sorted({instrs[o][0] for o in ops} - {"parameter"}), "files": short[:6]}


def _profile(compiled, state, opt_state, batch, trace_dir: str) -> dict:
  """One traced step: XLA op self times, summed per category and the top ops."""
  import jax
  from jax.profiler import ProfileData

  instrs, comps, frames = _parse_hlo(compiled.as_text())
  with jax.profiler.trace(trace_dir):
    start = time.perf_counter()
    out = compiled(state, opt_state, batch)
    float(out[2]["loss"])
    traced_s = time.perf_counter() - start
  files = glob.glob(f"{trace_dir}/**/*.xplane.pb", recursive=True)
  data = ProfileData.from_file(max(files, key=os.path.getmtime))
  per_op = collections.Counter()
  for plane in data.planes:
    for line in plane.lines:
      events = sorted(((e.start_ns, e.duration_ns, dict(e.stats).get("hlo_op"))
                       for e in line.events), key=lambda e: (e[0], -e[1]))
      stack: list[list] = []  # [end, op, self]
      for start_ns, dur, op in events:
        while stack and stack[-1][0] <= start_ns:
          end, name, self_ns = stack.pop()
          if name:
            per_op[name] += self_ns
        if stack:
          stack[-1][2] -= dur
        stack.append([start_ns + dur, op, dur])
      for _, name, self_ns in stack:
        if name:
          per_op[name] += self_ns
  per_cat = collections.Counter()
  for name, ns in per_op.items():
    per_cat[_category(instrs, comps, frames, name)] += ns
  total = sum(per_cat.values()) or 1
  top = [{"op": n, "category": _category(instrs, comps, frames, n), "s": ns / 1e9,
          **_describe(instrs, comps, frames, n)} for n, ns in per_op.most_common(40)]
  return {"traced_step_s": traced_s, "op_seconds": total / 1e9,
          "categories": {k: {"s": per_cat[k] / 1e9, "share": per_cat[k] / total}
                         for k in CATEGORIES if per_cat[k]},
          "top_ops": top}


# -- the parent ------------------------------------------------------------------------

def _process_env(v: Variant) -> tuple[tuple[str, str], ...]:
  """The variables of ``v.env`` that act on the whole process (all but the backend, which is
  read when a step is traced): variants differing in them run in different processes."""
  from jqlora.ops.registry import ENV_VAR
  return tuple((k, val) for k, val in v.env if k != ENV_VAR)


def _run_child(names: list[str], steps: int, profiled: set[str]) -> list[dict]:
  env = {**os.environ, "HF_HUB_OFFLINE": "1", "XLA_PYTHON_CLIENT_PREALLOCATE": "false"}
  for key, value in _process_env(VARIANTS[names[0]]):
    joined = key == "XLA_FLAGS" and env.get(key)
    env[key] = f"{env[key]} {value}" if joined else value
  with tempfile.TemporaryDirectory(prefix="jqlora_profile_") as tmp:
    out = pathlib.Path(tmp) / "result.json"
    cmd = [sys.executable, __file__, "--child", ",".join(names), "--steps", str(steps),
           "--profiled", ",".join(sorted(profiled)), "--out", str(out)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode:
      return [{"variant": n, "error": done.stderr[-3000:]} for n in names]
    return json.loads(out.read_text())


def table(results: list[dict]) -> str:
  """Markdown: one row per variant (speed-up against ``qlora`` run interleaved with it in the same
  process where there is one, else against the first ``qlora``), then each profile."""
  ok = [r for r in results if "error" not in r]
  first = next((r for r in ok if r["variant"] == "qlora"), ok[0] if ok else None)
  lines = ["| variant | B x T | median step s | tokens/s | speed-up vs qlora | MFU (f32 matmul) | "
           "XLA temp GiB | process peak RSS GiB | compile s | loss step 1 | load avg |",
           "|---" + "|---:" * 10 + "|"]
  for r in results:
    if "error" in r:
      lines.append(f"| {r['variant']} | failed: {r['error'].strip().splitlines()[-1][:80]} |")
      continue
    same = next((q for q in ok if q["variant"] == "qlora"
                 and q["load_average_build_run"] == r["load_average_build_run"]), first)
    lines.append(
        f"| {r['variant']} | {r['batch']} x {r['seq']} | {r['median_step_s']:.3f} | "
        f"{r['tokens_per_s']:.0f} | {same['median_step_s'] / r['median_step_s']:.2f}x"
        f"{'' if same['load_average_build_run'] == r['load_average_build_run'] else ' (other process)'}"
        f" | {r['mfu']:.0%} | "
        f"{r['xla_temp_bytes'] / 2**30:.2f} | {r['process_peak_rss_bytes'] / 2**30:.2f} | "
        f"{r['compile_s']:.1f} | {r['losses'][0]:.5f} | "
        f"{r['load_average'][0]:.1f}-{r['load_average'][1]:.1f} |")
  for r in results:
    p = r.get("profile")
    if not p:
      continue
    lines += ["", f"Profile of {r['variant']} (one traced step {p['traced_step_s']:.2f} s, XLA op "
              f"self time {p['op_seconds']:.2f} s; model {r['model_flops']['total'] / 1e9:.0f} GFLOP, "
              f"f32 matmul {r['calibration']['float32_flop_per_s'] / 1e9:.0f} GFLOP/s, bf16 "
              f"{r['calibration']['bfloat16_flop_per_s'] / 1e9:.0f} GFLOP/s):", "",
              "| category | s | share |", "|---|---:|---:|"]
    lines += [f"| {k} | {c['s']:.3f} | {c['share']:.1%} |" for k, c in p["categories"].items()]
    lines += ["", "| top op | opcode | category | s |", "|---|---|---|---:|"]
    lines += [f"| {o['op']} | {o['opcode']} | {o['category']} | {o['s']:.3f} |" for o in p["top_ops"][:10]]
  return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--variants", default=",".join(DEFAULT),
                      help="comma-separated (default: %(default)s; --list shows all)")
  parser.add_argument("--steps", type=int, default=6, help="timed steps per variant (first is warm-up)")
  parser.add_argument("--profile", action="store_true", help="trace every variant, not only "
                      + ", ".join(PROFILED))
  parser.add_argument("--list", action="store_true", help="print the variants and exit")
  parser.add_argument("--out-dir", default=str(pathlib.Path(__file__).parent / "results"))
  parser.add_argument("--name", default="profile_step",
                      help="the JSON's file name in --out-dir, without .json")
  parser.add_argument("--note", help="a remark kept in the JSON: what else ran on the machine")
  parser.add_argument("--child", help=argparse.SUPPRESS)
  parser.add_argument("--out", help=argparse.SUPPRESS)
  parser.add_argument("--profiled", default="", help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.list:
    for name, v in VARIANTS.items():
      print(f"{name:22s} {v.help}")
    return
  if args.child:
    with tempfile.TemporaryDirectory(prefix="jqlora_trace_") as trace:
      results = run_group(args.child.split(","), args.steps, set(args.profiled.split(",")), trace)
    pathlib.Path(args.out).write_text(json.dumps(results))
    return
  names = args.variants.split(",")
  unknown = [n for n in names if n not in VARIANTS]
  if unknown:
    parser.error(f"unknown variants {unknown}; --list shows them")
  report = {"machine": machine_info(), "steps": args.steps, "results": []}
  if args.note:
    report["note"] = args.note
  groups: dict[tuple, list[str]] = {}  # one process per process environment and batch shape
  for name in names:
    v = VARIANTS[name]
    groups.setdefault((_process_env(v), v.batch, v.seq), []).append(name)
  profiled = set(PROFILED) | (set(names) if args.profile else set())
  for group in groups.values():
    print(f"running {', '.join(group)} ...", file=sys.stderr, flush=True)
    report["results"] += _run_child(group, args.steps, profiled)
  report["machine_after"] = {"load_average": list(os.getloadavg())}
  out = pathlib.Path(args.out_dir)
  out.mkdir(parents=True, exist_ok=True)
  path = out / f"{args.name}.json"
  path.write_text(json.dumps(report, indent=2))
  print(table(report["results"]))
  print(f"wrote {path}")


if __name__ == "__main__":
  main()
