"""Where a step's GPU time goes, from a `jax.profiler` trace.

    with jax.profiler.trace(d, create_perfetto_trace=True):
      step(...)
    print(summarize(d))

Reads the Perfetto JSON that `create_perfetto_trace=True` writes and sums,
per device: the busy time of compute kernels and of host<->device copies
(each the union of its events' intervals, so concurrent streams are not
counted twice), how much of the copy time ran under compute (overlap), and
the kernels that took longest. A host copy that does not overlap adds its
whole time to the step.

`by_role` does more with a kept trace and the step's compiled HLO (both
written by `train_speed.py --profile --hlo-dir DIR`): it sums the kernels by
what they do, matching XLA's fusions to their HLO instructions:

    python benchmarks/trace_summary.py A.trace.json.gz A.hlo.txt [B... B...]
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import os
import re
import shutil
import tempfile

_COPY = ("memcpy", "memset", "d2h", "h2d", "copy-start", "copy-done")


def _union(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
  out: list[list[float]] = []
  for start, end in sorted(intervals):
    if out and start <= out[-1][1]:
      out[-1][1] = max(out[-1][1], end)
    else:
      out.append([start, end])
  return [(s, e) for s, e in out]


def _length(intervals) -> float:
  return sum(e - s for s, e in intervals)


def _intersection(a, b) -> float:
  """Total length of the overlap of two unions of intervals."""
  i = j = 0
  total = 0.0
  while i < len(a) and j < len(b):
    lo, hi = max(a[i][0], b[j][0]), min(a[i][1], b[j][1])
    total += max(0.0, hi - lo)
    if a[i][1] < b[j][1]:
      i += 1
    else:
      j += 1
  return total


def _trace_path(trace_dir: str) -> str:
  paths = glob.glob(os.path.join(trace_dir, "**", "perfetto_trace.json.gz"),
                    recursive=True)
  if not paths:
    raise FileNotFoundError(f"no perfetto_trace.json.gz under {trace_dir}")
  return max(paths, key=os.path.getmtime)


def _events(path: str) -> tuple[list[dict], dict]:
  """(events, thread names by (pid, tid)) of a Perfetto JSON trace."""
  with gzip.open(path) as f:
    data = json.load(f)
  events = data["traceEvents"] if isinstance(data, dict) else data
  threads = {(e["pid"], e.get("tid")): e["args"]["name"] for e in events
             if e.get("ph") == "M" and e.get("name") == "thread_name"}
  return events, threads


def _copy_line(line: str) -> bool:
  """A stream line that only copies, e.g. "Stream #9(MemcpyD2H)" (a line
  named "Stream #14(Memset,Compute)" also runs kernels)."""
  kinds = line.partition("(")[2].rstrip(")").lower()
  return bool(kinds) and "compute" not in kinds and any(
      k in kinds for k in _COPY)


def _by_role(kernels: collections.Counter, defs: dict[str, str]) -> dict:
  out = collections.Counter()
  for name, ms in kernels.items():
    out[role(name, defs)] += ms
  return {k: round(v, 1) for k, v in out.most_common()}


def summarize(trace_dir: str, top: int = 12) -> dict:
  """Per device: compute and copy busy ms, copy ms under compute, GPU ms by
  `role` (read from kernel names alone), and the top kernels.

  Returns {device name: {...}}; empty when the trace has no device events
  (a CPU run).
  """
  events, threads = _events(_trace_path(trace_dir))
  names = {e["pid"]: e["args"]["name"] for e in events
           if e.get("ph") == "M" and e.get("name") == "process_name"}
  by_thread = collections.defaultdict(list)
  for e in events:
    if e.get("ph") == "X" and names.get(e.get("pid"), "").startswith(
        "/device:"):
      by_thread[(e["pid"], e.get("tid"))].append(e)
  # Kernels and copies sit on "Stream #N" lines; other lines of a device
  # (XLA Ops, XLA Modules, ...) repeat them as summaries.
  streams = {k for k in by_thread if "stream" in threads.get(k, "").lower()}
  per = collections.defaultdict(lambda: dict(compute=[], copy=[], lines=set(),
                                             kernels=collections.Counter()))
  for key, evs in by_thread.items():
    line = threads.get(key, "")
    if streams and key not in streams:
      continue
    d = per[names[key[0]]]
    d["lines"].add(line)
    for e in evs:
      span = (float(e["ts"]), float(e["ts"]) + float(e.get("dur", 0)))
      name = e.get("name", "")
      is_copy = any(k in name.lower() for k in _COPY) or _copy_line(line)
      d["copy" if is_copy else "compute"].append(span)
      if not is_copy:
        d["kernels"][name] += (span[1] - span[0]) / 1e3  # ms
  out = {}
  for device, d in sorted(per.items()):
    compute, copy = _union(d["compute"]), _union(d["copy"])
    everything = _union(d["compute"] + d["copy"])
    out[device] = dict(
        span_ms=(everything[-1][1] - everything[0][0]) / 1e3
        if everything else 0.0,
        compute_ms=_length(compute) / 1e3,
        copy_ms=_length(copy) / 1e3,
        copy_under_compute_ms=_intersection(copy, compute) / 1e3,
        lines=sorted(d["lines"]),
        by_role_ms=_by_role(d["kernels"], {}),
        top_kernels_ms={k: round(v, 3)
                        for k, v in d["kernels"].most_common(top)})
  return out


def save_hlo(directory: str, name: str, compiled) -> str:
  """Writes `compiled`'s HLO to DIR/STEM.hlo.txt, STEM being `name` with
  characters other than [A-Za-z0-9_.-] as _; returns DIR/STEM, where
  `profile` can keep the trace beside it."""
  os.makedirs(directory, exist_ok=True)
  stem = os.path.join(directory, re.sub(r"[^A-Za-z0-9_.-]", "_", name))
  with open(stem + ".hlo.txt", "w") as f:
    f.write(compiled.as_text())
  return stem


def profile(run, keep: str | None = None, top: int = 30) -> dict:
  """`summarize` of a trace of `run()` (which must block until its device
  work is done); `keep`: a `save_hlo` stem, to keep the Perfetto trace as
  STEM.trace.json.gz."""
  import jax

  with tempfile.TemporaryDirectory() as d:
    with jax.profiler.trace(d, create_perfetto_trace=True):
      run()
    if keep:
      shutil.copy(_trace_path(d), keep + ".trace.json.gz")
    return summarize(d, top=top)


# -- kernels by what they do, with the compiled HLO ---------------------------

def _kernel_times(trace_path: str) -> collections.Counter:
  """GPU ms per kernel name (copies included) of a kept trace."""
  events, threads = _events(trace_path)
  out = collections.Counter()
  for e in events:
    if e.get("ph") == "X" and "stream" in threads.get(
        (e["pid"], e.get("tid")), "").lower():
      out[e["name"]] += float(e.get("dur", 0)) / 1e3
  return out


def _hlo_defs(hlo_path: str) -> dict[str, str]:
  defs = {}
  opener = gzip.open if hlo_path.endswith(".gz") else open
  with opener(hlo_path, "rt") as f:
    for line in f:
      m = re.match(r"\s*(?:ROOT )?%(\S+) = (.*)$", line)
      if m:
        defs.setdefault(m.group(1), m.group(2))
  return defs


def role(kernel: str, defs: dict[str, str]) -> str:
  """What a kernel of a LoRA training step does, from its name and, for
  XLA's fusions, the HLO instruction of that name in `defs` (its output type
  and the JAX op it came from; with no HLO, fusions count as "other"). cuBLASLt's kernels: "qq" in the name reads e4m3
  operands; "tss" writes float32 (the head's logits in these steps)."""
  m = re.match(r"(.*)_(\d+)$", kernel)
  names = ([f"{m.group(1)}.{m.group(2)}"] if m else []) + [kernel]
  hlo = next((defs[n] for n in names if n in defs), "")
  out_type = hlo.split(" fusion(")[0]
  op = re.search(r'op_name="([^"]*)"', hlo)
  op = op.group(1) if op else ""
  if "nvjet" in kernel and "qq" in kernel:
    return "GEMM, e4m3 operands"
  if "nvjet" in kernel and "_tss_" in kernel:
    return "GEMM, float32 output (LM head)"
  if "nvjet" in kernel or "xmma" in kernel:
    return "GEMM, bf16"
  if "gemm_fusion" in kernel:
    return "Triton GEMM fusions (LoRA products)"
  if any(k in kernel for k in ("sdpa", "cudnn", "fmha")):
    return "attention (cuDNN)"
  if "memcpy" in kernel or "transpose" in kernel or (
      "dynamic_slice" in kernel and "f8e4m3" in out_type):
    return "weight slices and transposes"
  if "f8e4m3" in out_type or "reduce_max" in op:
    return "FP8 quantization (with what fuses into it)"
  if "dynamic_update_slice" in kernel or "broadcast" in kernel:
    return "saving residuals"
  return "other (norms, activations, adds, loss, optimizer)"


def by_role(trace_path: str, hlo_path: str) -> dict[str, float]:
  """GPU ms of one traced step by `role`, from a kept trace and its HLO
  (`train_speed.py --profile --hlo-dir DIR` writes both)."""
  return _by_role(_kernel_times(trace_path), _hlo_defs(hlo_path))


if __name__ == "__main__":
  import sys

  # trace_summary.py TRACE.json.gz STEP.hlo.txt [TRACE2 HLO2]: a table.
  args = sys.argv[1:]
  runs = [by_role(args[i], args[i + 1]) for i in range(0, len(args), 2)]
  roles = sorted({k for r in runs for k in r}, key=lambda k: -sum(
      r.get(k, 0.0) for r in runs))
  for k in roles + ["all kernels"]:
    vals = [sum(r.values()) if k == "all kernels" else r.get(k, 0.0)
            for r in runs]
    print(f"| {k} | " + " | ".join(f"{v:.1f}" for v in vals) + " |")
