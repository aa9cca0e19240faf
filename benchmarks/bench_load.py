"""Peak memory of ``load_model(..., quantize=True)`` on a >= 1B-parameter bf16 checkpoint.

Writes a random Llama-shaped bf16 safetensors checkpoint (sharded, one shard at
a time, never whole in memory), then loads it with NF4 quantization in a fresh
subprocess and reads that process's peak resident set size. The target is

    peak RSS < 1.5 x (final model bytes + largest single tensor bytes)

reported twice: on the raw peak, and on the peak less the process's baseline
(its resident set with Python, JAX, Flax and jqlora imported and the CPU
backend started, just before loading).

  python benchmarks/bench_load.py [--dir /tmp/jqlora_bench_load] [--keep]
      [--out benchmarks/results/bench_load.json]

``--sharded`` instead loads a 0.33 B-parameter random bf16 checkpoint
(``SHARDED_CONFIG``) with ``load_model(..., mesh=...)`` on ``mesh.fsdp=8`` over 8
simulated CPU devices, as ``--processes`` processes of ``8 / processes`` devices
each (``jax.distributed`` on 127.0.0.1), and writes the ``"sharded"`` entry of
the JSON: per device, the peak of its ``jax.Array`` bytes (sampled every 20 ms
while loading, and at the end); per process, its peak RSS less its baseline; both
against ``budget = local devices / 8 x NF4 model + largest tensor`` (the target
is at most ``budget + SLACK_BYTES``); the checkpoint bytes each process read
(``jqlora.io.reads.READS``); and whether every loaded leaf (codes, scales, nested
scales, offsets, float tensors) equals ``load_model`` without a mesh byte for byte
(sha256 of each global leaf, the unsharded load in a separate process). First the
same processes load ``TINY_SHARDED_CONFIG`` (the same layers at toy size, so the
same compiled programs): each one's peak RSS less baseline is recorded beside the
budget as its measured ``fixed_overhead_bytes``, and ``meets_target_plus_fixed_overhead``
allows it on top of ``budget + SLACK_BYTES`` (``meets_target`` does not).

  python benchmarks/bench_load.py --sharded [--processes 1|2|8]

Every loading process opts in to glibc's loading setting, as the ``jqlora`` command
does (``jqlora.io.allocator``); the JSON's ``allocator`` says so. The CPU model, ISA
flags and load averages go in ``machine`` (``benchmarks/machine.py``).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import resource
import shutil
import subprocess
import sys
import time

import ml_dtypes
import numpy as np
from machine import machine_info

# TinyLlama-1.1B's shape: 1.10B parameters, untied head.
CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 2048,
    "intermediate_size": 5632,
    "num_hidden_layers": 22,
    "num_attention_heads": 32,
    "num_key_value_heads": 4,
    "vocab_size": 32000,
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-5,
    "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"},
    "tie_word_embeddings": False,
    "hidden_act": "silu",
    "torch_dtype": "bfloat16",
}
LAYERS_PER_SHARD = 2
#: 0.33 B parameters (24 layers of 1024 x 2816, GQA 16/4 heads, 32k vocabulary, untied head).
SHARDED_CONFIG = {**CONFIG, "hidden_size": 1024, "intermediate_size": 2816,
                  "num_hidden_layers": 24, "num_attention_heads": 16, "num_key_value_heads": 4}
#: The same layer structure at toy size (every dimension splits on ``fsdp=8`` as in
#: ``SHARDED_CONFIG``: 8 and 11 scale blocks per row, as 16 and 44 there), so its load runs
#: the same compiled programs: its RSS above baseline is the load's fixed per-process cost.
TINY_SHARDED_CONFIG = {**SHARDED_CONFIG, "hidden_size": 512, "intermediate_size": 704,
                       "num_hidden_layers": 2, "num_attention_heads": 8, "num_key_value_heads": 2,
                       "vocab_size": 512}
SLACK_BYTES = 16 << 20
ALLOCATOR = ("glibc mmap threshold 1 MiB while loading (jqlora.io.allocator."
             "return_freed_memory_while_loading, as the jqlora CLI sets it)")


def layer_shapes(c: dict) -> dict[str, tuple[int, ...]]:
  """Hugging Face name suffix -> shape of one decoder layer's tensors."""
  d, f = c["hidden_size"], c["intermediate_size"]
  kv = c["num_key_value_heads"] * d // c["num_attention_heads"]
  return {
      "self_attn.q_proj.weight": (d, d), "self_attn.k_proj.weight": (kv, d),
      "self_attn.v_proj.weight": (kv, d), "self_attn.o_proj.weight": (d, d),
      "mlp.gate_proj.weight": (f, d), "mlp.up_proj.weight": (f, d),
      "mlp.down_proj.weight": (d, f),
      "input_layernorm.weight": (d,), "post_attention_layernorm.weight": (d,),
  }


def shard_contents(c: dict) -> list[dict[str, tuple[int, ...]]]:
  """Names and shapes of each shard: the embedding, groups of layers, then norm + head."""
  d, v = c["hidden_size"], c["vocab_size"]
  shards = [{"model.embed_tokens.weight": (v, d)}]
  for start in range(0, c["num_hidden_layers"], LAYERS_PER_SHARD):
    stop = min(start + LAYERS_PER_SHARD, c["num_hidden_layers"])
    shards.append({f"model.layers.{i}.{k}": s for i in range(start, stop)
                   for k, s in layer_shapes(c).items()})
  shards.append({"model.norm.weight": (d,), "lm_head.weight": (v, d)})
  return shards


def write_checkpoint(folder: pathlib.Path, c: dict, seed: int = 0) -> dict:
  """Writes random bf16 shards + index + config; returns parameter and byte counts."""
  from safetensors.numpy import save_file

  folder.mkdir(parents=True, exist_ok=True)
  rng = np.random.default_rng(seed)
  shards = shard_contents(c)
  weight_map, n_params, largest = {}, 0, 0
  for i, contents in enumerate(shards):
    name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
    tensors = {}
    for key, shape in contents.items():
      if len(shape) == 1:
        x = np.ones(shape, np.float32)
      else:
        x = rng.standard_normal(shape, dtype=np.float32) * np.float32(0.02)
      tensors[key] = x.astype(ml_dtypes.bfloat16)
      weight_map[key] = name
      n_params += int(np.prod(shape))
      largest = max(largest, tensors[key].nbytes)
    save_file(tensors, folder / name, metadata={"format": "pt"})
    del tensors
  (folder / "model.safetensors.index.json").write_text(
      json.dumps({"metadata": {"total_size": 2 * n_params}, "weight_map": weight_map}))
  (folder / "config.json").write_text(json.dumps(c, indent=2))
  return {"params": n_params, "checkpoint_bytes": 2 * n_params, "largest_tensor_bytes": largest}


def _peak_rss_bytes() -> int:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _current_rss_bytes() -> int:
  for line in pathlib.Path("/proc/self/status").read_text().splitlines():
    if line.startswith("VmRSS:"):
      return int(line.split()[1]) * 1024
  raise RuntimeError("no VmRSS in /proc/self/status")


def _as_the_cli() -> None:
  """glibc's loading setting on, as ``jqlora`` (the CLI) sets it for its process
  (``jqlora.io.allocator``; a library caller opts in the same way)."""
  from jqlora.io.allocator import return_freed_memory_while_loading

  return_freed_memory_while_loading()


def child(folder: str) -> None:
  """Runs in the subprocess: load with quantize=True, print one JSON line."""
  import jax
  import jax.numpy as jnp
  from flax import nnx

  import jqlora
  import jqlora.models
  from jqlora.io.loading import load_model

  _as_the_cli()
  jax.block_until_ready(jqlora.quantize_nf4(jnp.ones((64, 64), jnp.bfloat16)).packed)
  baseline = _current_rss_bytes()
  start = time.perf_counter()
  model = load_model(folder, quantize=True, dtype=jnp.bfloat16, progress=False)
  leaves = jax.tree.leaves(nnx.state(model))
  jax.block_until_ready(leaves)
  seconds = time.perf_counter() - start
  model_bytes = sum(int(x.nbytes) for x in leaves if hasattr(x, "nbytes"))
  print(json.dumps({"baseline_rss_bytes": baseline, "peak_rss_bytes": _peak_rss_bytes(),
                    "final_rss_bytes": _current_rss_bytes(), "model_bytes": model_bytes,
                    "load_seconds": seconds}))


def _per_device_bytes() -> dict[str, int]:
  import jax

  out: dict[str, int] = {}
  for x in jax.live_arrays():
    if not isinstance(x.sharding, jax.sharding.NamedSharding):
      continue  # the per-shard views that reading ``addressable_shards`` itself leaves alive
    try:
      for shard in x.addressable_shards:
        out[str(shard.device)] = out.get(str(shard.device), 0) + shard.data.nbytes
    except RuntimeError:  # an array deleted while it was sampled
      continue
  return out


def _leaf_hashes(model) -> dict[str, str]:
  """sha256 of each leaf's global bytes, by path (gathered one leaf at a time)."""
  import hashlib

  import jax
  from flax import nnx
  from jax.experimental import multihost_utils

  out = {}
  for path, v in nnx.to_flat_state(nnx.state(model)):
    for i, leaf in enumerate(jax.tree.leaves(v.get_value())):
      if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
        leaf = jax.random.key_data(leaf)
      if not leaf.is_fully_addressable:
        leaf = multihost_utils.process_allgather(leaf, tiled=True)
      host = np.asarray(leaf)
      out[f"{'/'.join(map(str, path))}[{i}]"] = f"{host.dtype}{host.shape}:" + \
          hashlib.sha256(host.tobytes()).hexdigest()
  return out


def sharded_child(folder: str, processes: int, process_id: int, port: int) -> None:
  """One process of the sharded load (or, with ``processes`` 0, the unsharded reference)."""
  import threading

  import jax

  if processes > 1:
    jax.distributed.initialize(f"127.0.0.1:{port}", processes, process_id)
  import jax.numpy as jnp

  import jqlora
  from jqlora import parallel
  from jqlora.io.loading import load_model
  from jqlora.io.reads import READS

  _as_the_cli()
  if processes == 0:
    model = load_model(folder, quantize=True, dtype=jnp.bfloat16, progress=False)
    print(json.dumps({"hashes": _leaf_hashes(model)}))
    return
  mesh = parallel.make_mesh(fsdp=8)
  jax.block_until_ready(jqlora.quantize_nf4(jnp.ones((64, 64), jnp.bfloat16)).packed)
  baseline = _current_rss_bytes()
  peak: dict[str, int] = {}
  done = threading.Event()

  def sample() -> None:
    while not done.is_set():
      for device, n in _per_device_bytes().items():
        peak[device] = max(peak.get(device, 0), n)
      done.wait(0.02)

  sampler = threading.Thread(target=sample, daemon=True)
  sampler.start()
  READS.reset()
  start = time.perf_counter()
  model = load_model(folder, quantize=True, dtype=jnp.bfloat16, progress=False, mesh=mesh)
  jax.block_until_ready(jax.tree.leaves(model))
  seconds = time.perf_counter() - start
  done.set()
  sampler.join()
  final = _per_device_bytes()
  for device, n in final.items():
    peak[device] = max(peak.get(device, 0), n)
  rss = _peak_rss_bytes()
  from flax import nnx

  leaves = jax.tree.leaves(nnx.state(model))
  model_bytes = sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in leaves
                    if hasattr(x, "shape") and not jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key))
  print(json.dumps({"process": process_id, "devices": jax.local_device_count(),
                    "baseline_rss_bytes": baseline, "peak_rss_bytes": rss,
                    "load_seconds": seconds, "bytes_read": READS.bytes,
                    "peak_device_bytes": peak, "final_device_bytes": final,
                    "model_bytes": model_bytes, "hashes": _leaf_hashes(model)}))


def _free_port() -> int:
  import socket

  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _sharded_runs(folder: pathlib.Path, p: int, env: dict) -> list[dict]:
  """The ``p`` loading processes' JSON lines, by process id."""
  port = _free_port()
  procs = [subprocess.Popen([sys.executable, __file__, "--sharded-child", str(folder),
                             str(p), str(i), str(port)], env=env, stdout=subprocess.PIPE,
                            text=True) for i in range(p)]
  runs = [json.loads(proc.communicate()[0].strip().splitlines()[-1]) for proc in procs]
  if any(proc.returncode for proc in procs):
    raise SystemExit(f"a loading process failed: {[proc.returncode for proc in procs]}")
  return runs


def sharded(args) -> None:
  """Writes the checkpoints, runs the sharded loads (toy and full) and the reference,
  updates the JSON."""
  folder, tiny_folder = pathlib.Path(args.dir), pathlib.Path(args.dir + "_tiny")
  machine = {**machine_info(), "note": args.machine}
  p = args.processes
  env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={8 // p}",
         "JAX_PLATFORMS": "cpu"}
  try:
    write_checkpoint(tiny_folder, TINY_SHARDED_CONFIG)
    tiny = _sharded_runs(tiny_folder, p, env)
  finally:
    shutil.rmtree(tiny_folder, ignore_errors=True)
  ckpt = write_checkpoint(folder, SHARDED_CONFIG)
  try:
    runs = _sharded_runs(folder, p, env)
    ref = subprocess.run([sys.executable, __file__, "--sharded-child", str(folder), "0", "0", "0"],
                         env={**env, "XLA_FLAGS": ""}, check=True, capture_output=True, text=True)
    reference = json.loads(ref.stdout.strip().splitlines()[-1])["hashes"]
  finally:
    if not args.keep:
      shutil.rmtree(folder, ignore_errors=True)
  model = runs[0]["model_bytes"]
  tensor = ckpt["largest_tensor_bytes"]
  rows = []
  for run, toy in zip(runs, tiny):
    budget_device = model / 8 + tensor
    budget_process = run["devices"] * model / 8 + tensor
    fixed = toy["peak_rss_bytes"] - toy["baseline_rss_bytes"]
    rows.append({
        "process": run["process"], "devices": run["devices"], "load_seconds": run["load_seconds"],
        "bytes_read": run["bytes_read"], "read_fraction": run["bytes_read"] / ckpt["checkpoint_bytes"],
        "peak_device_bytes_max": max(run["peak_device_bytes"].values()),
        "final_device_bytes_max": max(run["final_device_bytes"].values()),
        "device_budget_bytes": budget_device,
        "device_peak_over_budget": max(run["peak_device_bytes"].values()) / budget_device,
        "baseline_rss_bytes": run["baseline_rss_bytes"], "peak_rss_bytes": run["peak_rss_bytes"],
        "process_budget_bytes": budget_process,
        "rss_minus_baseline_over_budget": (run["peak_rss_bytes"] - run["baseline_rss_bytes"])
                                          / budget_process,
        "fixed_overhead_bytes": fixed, "fixed_overhead_model_bytes": toy["model_bytes"],
        "rss_minus_baseline_over_budget_plus_fixed": (run["peak_rss_bytes"]
                                                      - run["baseline_rss_bytes"])
                                                     / (budget_process + fixed),
        "equals_unsharded_byte_for_byte": run["hashes"] == reference,
        "leaves_compared": len(reference)})
  def meets(fixed: bool) -> bool:
    return all(r["peak_device_bytes_max"] <= r["device_budget_bytes"] + SLACK_BYTES
               and r["peak_rss_bytes"] - r["baseline_rss_bytes"]
               <= r["process_budget_bytes"] + SLACK_BYTES + fixed * r["fixed_overhead_bytes"]
               and r["equals_unsharded_byte_for_byte"] for r in rows)

  ok = meets(False)
  entry = {**ckpt, "config": SHARDED_CONFIG, "mesh": {"fsdp": 8}, "processes": p,
           "model_bytes": model, "slack_bytes": SLACK_BYTES, "meets_target": ok,
           "meets_target_plus_fixed_overhead": meets(True),
           "fixed_overhead": "per process: peak RSS less baseline of the same sharded load of "
                             "TINY_SHARDED_CONFIG (same programs, model fixed_overhead_model_bytes)",
           "tiny_config": TINY_SHARDED_CONFIG, "runs": rows,
           "allocator": ALLOCATOR,
           "machine": {**machine, "load_average_end": [round(x, 2) for x in os.getloadavg()]}}
  out = pathlib.Path(args.out)
  result = json.loads(out.read_text()) if out.is_file() else {}
  result.setdefault("sharded", {})[f"{p}_process"] = entry
  out.write_text(json.dumps(result, indent=2) + "\n")
  mib = 2.0 ** 20
  print(f"{ckpt['params'] / 1e9:.3f} B params, NF4 model {model / mib:.1f} MiB, largest tensor "
        f"{tensor / mib:.1f} MiB, {p} process(es) x {8 // p} devices, fsdp=8")
  for r in rows:
    print(f"  process {r['process']}: device peak {r['peak_device_bytes_max'] / mib:.1f} MiB "
          f"(budget {r['device_budget_bytes'] / mib:.1f}), RSS - baseline "
          f"{(r['peak_rss_bytes'] - r['baseline_rss_bytes']) / mib:.1f} MiB (budget "
          f"{r['process_budget_bytes'] / mib:.1f}; fixed overhead measured on a toy model "
          f"{r['fixed_overhead_bytes'] / mib:.1f}), read {r['read_fraction']:.3f} of the "
          f"checkpoint, {r['load_seconds']:.1f} s, byte-equal: {r['equals_unsharded_byte_for_byte']}")
  print(f"meets target: {ok} (with the measured fixed overhead: "
        f"{entry['meets_target_plus_fixed_overhead']}); wrote {out}")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--dir", default="/tmp/jqlora_bench_load", help="checkpoint folder")
  parser.add_argument("--keep", action="store_true", help="keep the checkpoint afterwards")
  parser.add_argument("--out", default=str(pathlib.Path(__file__).parent / "results" / "bench_load.json"))
  parser.add_argument("--sharded", action="store_true", help="the mesh.fsdp=8 sharded load")
  parser.add_argument("--processes", type=int, default=1, choices=(1, 2, 4, 8))
  parser.add_argument("--machine", default="", help="a note naming the machine, for the JSON")
  parser.add_argument("--child", help=argparse.SUPPRESS)
  parser.add_argument("--sharded-child", nargs=4, help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.child:
    child(args.child)
    return
  if args.sharded_child:
    folder, processes, process_id, port = args.sharded_child
    sharded_child(folder, int(processes), int(process_id), int(port))
    return
  if args.sharded:
    sharded(args)
    return

  folder = pathlib.Path(args.dir)
  machine = {**machine_info(), "note": args.machine}
  start = time.perf_counter()
  ckpt = write_checkpoint(folder, CONFIG)
  write_seconds = time.perf_counter() - start
  try:
    proc = subprocess.run([sys.executable, __file__, "--child", str(folder)],
                          check=True, capture_output=True, text=True)
  finally:
    if not args.keep:
      shutil.rmtree(folder, ignore_errors=True)
  run = json.loads(proc.stdout.strip().splitlines()[-1])

  budget = run["model_bytes"] + ckpt["largest_tensor_bytes"]
  peak, base = run["peak_rss_bytes"], run["baseline_rss_bytes"]
  result = {
      **ckpt, **run,
      "budget_bytes": budget,
      "ratio_raw": peak / budget,
      "ratio_minus_baseline": (peak - base) / budget,
      "target_ratio": 1.5,
      "write_seconds": write_seconds,
      "config": CONFIG,
      "allocator": ALLOCATOR,
      "machine": {**machine, "load_average_end": [round(x, 2) for x in os.getloadavg()]},
  }
  gib = 2.0 ** 30
  rows = [
      ("parameters", f"{ckpt['params'] / 1e9:.3f} B"),
      ("checkpoint (bf16)", f"{ckpt['checkpoint_bytes'] / gib:.3f} GiB"),
      ("largest tensor", f"{ckpt['largest_tensor_bytes'] / gib:.3f} GiB"),
      ("final model (NF4 + float)", f"{run['model_bytes'] / gib:.3f} GiB"),
      ("baseline RSS (python+jax)", f"{base / gib:.3f} GiB"),
      ("peak RSS", f"{peak / gib:.3f} GiB"),
      ("RSS after load", f"{run['final_rss_bytes'] / gib:.3f} GiB"),
      ("load time", f"{run['load_seconds']:.1f} s"),
      ("peak / (model + largest)", f"{result['ratio_raw']:.3f}  (target < 1.5)"),
      ("(peak - baseline) / (model + largest)", f"{result['ratio_minus_baseline']:.3f}  (target < 1.5)"),
  ]
  width = max(len(k) for k, _ in rows)
  print("\n".join(f"{k:<{width}}  {v}" for k, v in rows))
  out = pathlib.Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  if out.is_file():  # keep the --sharded entries
    result |= {k: v for k, v in json.loads(out.read_text()).items() if k == "sharded"}
  out.write_text(json.dumps(result, indent=2) + "\n")
  print(f"wrote {out}")


if __name__ == "__main__":
  main()
