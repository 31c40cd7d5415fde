"""Loop-aware costs of a compiled (optimised, scheduled) HLO module: what the program that runs executes.

XLA's `cost_analysis()` counts every `while` body once, so for a scanned step it misses 27 of 28 layers; and
unrolled 1-/2-layer copies of the step are not the program that runs (with `nn.remat(prevent_cse=False)` the
compiler merges most of the rematerialised forward into the original forward there, while the scanned
backward loop must recompute it). This module reads the compiled HLO text instead and counts each
computation once per execution: a while body x its trip count (read from the loop condition and the loop
counter's initial value), fusions and calls x their callers' count.

Per instruction, by the rules of XLA's HloCostAnalysis:
- `mxu_flops`: dot (2 x output x contracted size) and convolution (2 x FMAs over the valid window
  positions, feature and batch groups);
- `kernel_*`: Pallas `tpu_custom_call`s through the `cost_estimate` they carry (flops, bytes, transcendentals);
- `vpu_flops` / `transcendentals`: elementwise ops (one per output element) and reductions;
- `gather_bytes`: the MoT routing's gathers and scatters (output / update bytes);
- `hbm_bytes`: for each instruction outside fusions (a fusion, a copy, a kernel, ...) the bytes it reads and
  writes; a fusion parameter read only through dynamic-slice / gather / slice counts the slices, an operand
  updated in place by dynamic-update-slice counts the update;
- `collectives`: the full buffer of each all-gather / reduce-scatter / all-reduce / all-to-all / permute.

Size (over 400 lines: one HLO text parser and the cost rules that walk its computations; the rules share the
parser's instruction and shape helpers throughout).
"""
from __future__ import annotations

import collections
import dataclasses
import json
import math
import re
from typing import Dict, List, Mapping, Optional, Tuple

import numpy as np

_DTYPE_BYTES = dict(pred=1, s4=0.5, u4=0.5, s8=1, u8=1, f8e4m3fn=1, f8e5m2=1, f8e4m3b11fnuz=1, s16=2, u16=2,
                    bf16=2, f16=2, s32=4, u32=4, f32=4, s64=8, u64=8, f64=8, c64=8, c128=16)
_ARRAY = re.compile(r"\b(" + "|".join(sorted(_DTYPE_BYTES, key=len, reverse=True)) + r")\[([0-9,]*)\]")
_COMP_HEAD = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s*\(.*\{\s*$")
_CALLS = re.compile(r"\b(calls|body|condition|to_apply|true_computation|false_computation)=%([\w.\-]+)")
_CALL_LISTS = re.compile(r"\b(branch_computations|called_computations)=\{([^}]*)\}")
_OPERAND = re.compile(r"%([\w.\-]+)")
COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")
ELEMENTWISE = frozenset("""abs add and atan2 cbrt ceil clamp compare complex convert cosine divide erf exponential
    exponential-minus-one floor imag is-finite log log-plus-one logistic maximum minimum multiply negate not or
    popcnt power real remainder round-nearest-afz round-nearest-even rsqrt select shift-left
    shift-right-arithmetic shift-right-logical sign sine sqrt subtract tan tanh xor""".split())
TRANSCENDENTAL = frozenset("""atan2 cbrt cosine erf exponential exponential-minus-one log log-plus-one logistic
    power rsqrt sine sqrt tan tanh""".split())
# Outside fusions these move no HBM bytes of their own (bookkeeping, control flow, async halves).
_NO_BYTES = frozenset("""parameter constant get-tuple-element tuple bitcast while call conditional after-all
    partition-id replica-id opt-barrier optimization-barrier add-dependency copy-done recv-done send-done
    all-gather-done all-reduce-done collective-permute-done async-done async-update""".split())
COST_KEYS = ("mxu_flops", "vpu_flops", "transcendentals", "kernel_flops", "kernel_bytes", "kernel_transcendentals",
             "gather_bytes", "hbm_bytes", "collective_bytes")


@dataclasses.dataclass
class Instr:
  name: str
  shape: str  # the result shape text (a tuple for multi-output ops)
  op: str
  operands: List[str]
  args: str  # the text between the op's parentheses (a constant's or a parameter's literal)
  attrs: str
  root: bool = False


@dataclasses.dataclass
class Module:
  computations: Dict[str, List[Instr]]
  entry: str

  def by_name(self, comp: str) -> Dict[str, Instr]:
    return {i.name: i for i in self.computations[comp]}


def _matching(s: str, start: int) -> int:
  """Index just past the bracket closing s[start] ('(' or '{'), skipping nested brackets of both kinds."""
  depth = 0
  for i in range(start, len(s)):
    c = s[i]
    if c in "({[":
      depth += 1
    elif c in ")}]":
      depth -= 1
      if depth == 0:
        return i + 1
  raise ValueError(f"unbalanced HLO text: {s[start:start + 200]!r}")


def _parse_instr(line: str) -> Optional[Instr]:
  s = line.strip()
  root = s.startswith("ROOT ")
  if root:
    s = s[5:]
  if not s.startswith("%") or " = " not in s:
    return None
  name, rest = s[1:].split(" = ", 1)
  if rest.startswith("("):
    end = _matching(rest, 0)
  else:
    end = rest.index(" ")
  shape, rest = rest[:end], rest[end:].lstrip()
  paren = rest.find("(")
  if paren < 0:
    return None
  op = rest[:paren]
  close = _matching(rest, paren)
  args = rest[paren + 1:close - 1]
  return Instr(name, shape, op, _OPERAND.findall(args), args, rest[close:], root)


def parse(text: str) -> Module:
  comps: Dict[str, List[Instr]] = {}
  entry, current = "", None
  for line in text.splitlines():
    if not line:
      continue
    if not line[0].isspace():
      m = _COMP_HEAD.match(line)
      if m:
        current = m.group(2)
        comps[current] = []
        if m.group(1):
          entry = current
      elif line.startswith("}"):
        current = None
      continue
    if current is not None:
      ins = _parse_instr(line)
      if ins is not None:
        comps[current].append(ins)
  if not entry:
    raise ValueError("HLO text has no ENTRY computation")
  return Module(comps, entry)


def arrays(shape: str) -> List[Tuple[str, Tuple[int, ...]]]:
  return [(dt, tuple(int(d) for d in dims.split(",") if d)) for dt, dims in _ARRAY.findall(shape)]


def nbytes(shape: str) -> float:
  return float(sum(math.prod(dims) * _DTYPE_BYTES[dt] for dt, dims in arrays(shape)))


def elements(shape: str) -> float:
  a = arrays(shape)
  return float(math.prod(a[0][1])) if a else 0.0


def _dims(shape: str) -> Tuple[int, ...]:
  a = arrays(shape)
  return a[0][1] if a else ()


def _attr(attrs: str, key: str) -> str:
  m = re.search(r"\b" + key + r"=([^ ,]+)", attrs)
  return m.group(1) if m else ""


def _int_list(attrs: str, key: str) -> List[int]:
  m = re.search(r"\b" + key + r"=\{([0-9,]*)\}", attrs)
  return [int(x) for x in m.group(1).split(",") if x] if m else []


def _valid_positions(out: int, kernel: int, inp: int, stride: int, pad_lo: int, lhs_dil: int, rhs_dil: int) -> int:
  """Pairs (output index, kernel index) that read a real (not padding, not dilation-hole) input element."""
  small, large = (np.arange(kernel), np.arange(out)) if kernel <= out else (np.arange(out), np.arange(kernel))
  count = 0
  for s in small:
    k, o = (s, large) if kernel <= out else (large, s)
    idx = o * stride - pad_lo + k * rhs_dil
    ok = (idx >= 0) & (idx % lhs_dil == 0) & (idx // lhs_dil < inp)
    count += int(np.count_nonzero(ok))
  return count


def conv_flops(ins: Instr, shapes: Mapping[str, str]) -> float:
  """2 x FMAs of an HLO convolution (HloCostAnalysis::GetConvolutionFlops)."""
  lhs, rhs = _dims(shapes[ins.operands[0]]), _dims(shapes[ins.operands[1]])
  out = _dims(ins.shape)
  labels = _attr(ins.attrs, "dim_labels")
  lhs_l, rest = labels.split("_", 1)
  rhs_l, out_l = rest.split("->")
  fgc = int(_attr(ins.attrs, "feature_group_count") or 1)
  bgc = int(_attr(ins.attrs, "batch_group_count") or 1)
  window = re.search(r"window=\{([^}]*)\}", ins.attrs)
  win = dict(kv.split("=") for kv in window.group(1).split()) if window else {}
  n_sp = sum(c.isdigit() for c in lhs_l)
  field = lambda key, default: [x for x in win[key].split("x")] if key in win else [default] * n_sp
  stride, pad, lhs_dil, rhs_dil = field("stride", "1"), field("pad", "0_0"), field("lhs_dilate", "1"), \
      field("rhs_dilate", "1")
  fma = (lhs[lhs_l.index("f")] / fgc) * out[out_l.index("f")] * (lhs[lhs_l.index("b")] / bgc)
  for d in range(n_sp):
    c = str(d)
    fma *= _valid_positions(out[out_l.index(c)], rhs[rhs_l.index(c)], lhs[lhs_l.index(c)], int(stride[d]),
                            int(pad[d].split("_")[0]), int(lhs_dil[d]), int(rhs_dil[d]))
  return 2.0 * fma


def dot_flops(ins: Instr, shapes: Mapping[str, str]) -> float:
  lhs = _dims(shapes[ins.operands[0]])
  contracted = math.prod(lhs[d] for d in _int_list(ins.attrs, "lhs_contracting_dims"))
  return 2.0 * elements(ins.shape) * contracted


def kernel_cost(ins: Instr) -> Dict[str, float]:
  m = re.search(r'"cost_estimate":(\{[^}]*\})', ins.attrs)
  if not m:
    return {}
  c = json.loads(m.group(1))
  return dict(kernel_flops=float(c.get("flops", 0)), kernel_bytes=float(c.get("bytes_accessed", 0)),
              kernel_transcendentals=float(c.get("transcendentals", 0)))


# ----------------------------------------------------------------------------------------------------------
# Trip counts.
# ----------------------------------------------------------------------------------------------------------

def _resolve(module: Module, comp: str, name: str, depth: int = 0):
  """('const', v) | ('gte', tuple index) | None for a scalar inside `comp` (through fusions and copies)."""
  if depth > 8:
    return None
  ins = module.by_name(comp).get(name)
  if ins is None:
    return None
  if ins.op == "constant":
    return ("const", int(ins.args)) if re.fullmatch(r"-?\d+", ins.args.strip()) else None
  if ins.op == "get-tuple-element":
    return ("gte", int(_attr(ins.attrs, "index")))
  if ins.op in ("copy", "bitcast", "convert", "reshape") and ins.operands:
    return _resolve(module, comp, ins.operands[0], depth + 1)
  if ins.op == "fusion":
    called = _attr(ins.attrs, "calls").lstrip("%")
    root = next((i for i in module.computations.get(called, []) if i.root), None)
    return _resolve_param(module, called, root.name if root else "", ins, comp, depth + 1)
  return None


def _resolve_param(module, fused: str, name: str, fusion: Instr, outer: str, depth: int):
  ins = module.by_name(fused).get(name)
  if ins is None:
    return None
  if ins.op == "parameter":
    return _resolve(module, outer, fusion.operands[int(ins.args)], depth + 1)
  if ins.op == "constant":
    return _resolve(module, fused, name, depth + 1)
  if ins.op in ("copy", "bitcast", "convert", "reshape") and ins.operands:
    return _resolve_param(module, fused, ins.operands[0], fusion, outer, depth + 1)
  return None


def trip_count(module: Module, parent: str, loop: Instr) -> Optional[int]:
  """Iterations of a while loop: `counter < N` (or <=, >, >=) with the counter's initial value in the loop's
  input tuple and its step in the body's output tuple; None when the HLO does not say."""
  known = re.search(r'"known_trip_count":\{"n":"(\d+)"', loop.attrs)
  if known:
    return int(known.group(1))
  cond = _attr(loop.attrs, "condition").lstrip("%")
  body = _attr(loop.attrs, "body").lstrip("%")
  root = next((i for i in module.computations.get(cond, []) if i.root), None)
  if root is None:
    return None
  compare, where, fusion = root, cond, None
  if root.op == "fusion":
    fused = _attr(root.attrs, "calls").lstrip("%")
    compare = next((i for i in module.computations.get(fused, []) if i.root), None)
    where, fusion = fused, root
    if compare is None:
      return None
  if compare.op != "compare" or len(compare.operands) != 2:
    return None
  direction = _attr(compare.attrs, "direction")
  if fusion is None:
    a, b = (_resolve(module, where, o) for o in compare.operands)
  else:
    a, b = (_resolve_param(module, where, o, fusion, cond, 0) for o in compare.operands)
  if a is None or b is None:
    return None
  if a[0] == "const" and b[0] == "gte":
    a, b = b, a
    direction = dict(LT="GT", LE="GE", GT="LT", GE="LE").get(direction, direction)
  if a[0] != "gte" or b[0] != "const":
    return None
  index, limit = a[1], b[1]
  init = _init_value(module, parent, loop, index)
  step = _step_value(module, body, index)
  if init is None or not step:
    return None
  span = {"LT": limit - init, "LE": limit - init + 1, "GT": init - limit, "GE": init - limit + 1}.get(direction)
  if span is None:
    return None
  return max(0, -(-span // abs(step)))


def _init_value(module: Module, parent: str, loop: Instr, index: int) -> Optional[int]:
  tup = module.by_name(parent).get(loop.operands[0]) if loop.operands else None
  if tup is None or tup.op != "tuple" or index >= len(tup.operands):
    return None
  v = _resolve(module, parent, tup.operands[index])
  return v[1] if v and v[0] == "const" else None


def _step_value(module: Module, body: str, index: int) -> Optional[int]:
  """The constant the loop body adds to tuple element `index` (top-level or inside a fusion)."""
  root = next((i for i in module.computations.get(body, []) if i.root), None)
  if root is None or root.op != "tuple" or index >= len(root.operands):
    return None
  ins = module.by_name(body).get(root.operands[index])
  while ins is not None and ins.op in ("copy", "bitcast") and ins.operands:
    ins = module.by_name(body).get(ins.operands[0])
  if ins is None:
    return None
  op, operands, resolve = ins.op, ins.operands, lambda o: _resolve(module, body, o)
  if ins.op == "fusion":
    fused = _attr(ins.attrs, "calls").lstrip("%")
    inner = next((i for i in module.computations.get(fused, []) if i.root), None)
    if inner is None:
      return None
    op, operands = inner.op, inner.operands
    resolve = lambda o: _resolve_param(module, fused, o, ins, body, 0)
  if op not in ("add", "subtract"):
    return None
  vals = [resolve(o) for o in operands]
  consts = [v[1] for v in vals if v and v[0] == "const"]
  if len(consts) != 1 or ("gte", index) not in vals:
    return None
  return consts[0] if op == "add" else -consts[0]


# ----------------------------------------------------------------------------------------------------------
# Costs.
# ----------------------------------------------------------------------------------------------------------

def _called(ins: Instr) -> List[Tuple[str, str]]:
  out = [(k, v) for k, v in _CALLS.findall(ins.attrs)]
  for k, lst in _CALL_LISTS.findall(ins.attrs):
    out += [(k, v) for v in _OPERAND.findall(lst)]
  return out


def _fusion_bytes(module: Module, fusion: Instr, shapes: Mapping[str, str]) -> float:
  """HBM bytes of one fusion: its operands as read (slices of sliced operands, the update of an in-place
  dynamic-update-slice) plus its outputs as written."""
  fused = _attr(fusion.attrs, "calls").lstrip("%")
  body = module.computations.get(fused, [])
  users = collections.defaultdict(list)
  params = {}
  for ins in body:
    if ins.op == "parameter":
      params[int(ins.args)] = ins.name
    for pos, o in enumerate(ins.operands):
      users[o].append((ins, pos))
  inner = {i.name: i.shape for i in body}

  def read(name: str, depth: int = 0) -> Optional[float]:
    """Bytes read of a fused value if every use reads a slice of it, else None (all of it)."""
    total = 0.0
    for u, pos in users.get(name, []):
      if u.op in ("dynamic-slice", "slice", "gather") and pos == 0:
        total += nbytes(u.shape)
      elif u.op == "dynamic-update-slice" and pos == 0:
        total += nbytes(inner[u.operands[1]])
      elif u.op in ("bitcast", "reshape") and depth < 4:
        sub = read(u.name, depth + 1)
        if sub is None:
          return None
        total += sub
      else:
        return None
    return total

  total = 0.0
  for k, operand in enumerate(fusion.operands):
    full = nbytes(shapes.get(operand, ""))
    part = read(params[k]) if k in params else None
    total += full if part is None else min(part, full)
  root = next((i for i in body if i.root), None)
  outs = [root] if root is not None and root.op != "tuple" else [
      next((i for i in body if i.name == o), None) for o in (root.operands if root else [])]
  for o in outs:
    if o is not None and o.op == "dynamic-update-slice":
      total += nbytes(inner[o.operands[1]])
    elif o is not None:
      total += nbytes(o.shape)
  return total


@dataclasses.dataclass
class Loop:
  name: str
  label: str  # the op_name of the first instruction of its body that has one
  trips: Optional[int]
  per_iteration: Dict[str, float]


class Analysis:
  """Per-computation costs (one execution, callees included), memoised; `total` is the entry's.

  `op_seconds(costs) -> {name: seconds}`: a time model applied to every instruction outside fusions (a fusion
  with its fused computation's costs, a kernel, a copy, ...); its keys are summed like the costs."""

  def __init__(self, module: Module, count_trips: bool = True, op_seconds=None):
    self.module, self.count_trips, self.op_seconds = module, count_trips, op_seconds
    self._memo: Dict[Tuple[str, bool], Dict[str, float]] = {}
    self.loops: List[Loop] = []
    self.unknown_trips = 0
    self.total = self.cost(module.entry, fused=False)

  def cost(self, comp: str, fused: bool) -> Dict[str, float]:
    key = (comp, fused)
    if key in self._memo:
      return self._memo[key]
    self._memo[key] = {}  # cycle guard (HLO call graphs are acyclic)
    acc: Dict[str, float] = collections.defaultdict(float)
    shapes = {i.name: i.shape for i in self.module.computations.get(comp, [])}
    for ins in self.module.computations.get(comp, []):
      item = collections.defaultdict(float, self.own(ins, shapes, fused, comp))
      for kind, callee in _called(ins):
        if kind == "to_apply" or callee not in self.module.computations:
          continue  # reducers' scalar bodies: counted by the reduce itself
        mult = 1.0
        if ins.op == "while" and kind == "body":
          trips = trip_count(self.module, comp, ins) if self.count_trips else 1
          if trips is None:
            self.unknown_trips += 1
            trips = 1
          mult = float(trips)
        inner = self.cost(callee, fused=fused or ins.op == "fusion")
        if ins.op == "while" and kind == "body" and not any(l.name == ins.name for l in self.loops):
          self.loops.append(Loop(ins.name, _label(self.module.computations[callee]), int(mult), dict(inner)))
        for k, v in inner.items():
          item[k] += mult * v
      if self.op_seconds is not None and not fused and ins.op not in ("while", "call", "conditional"):
        for k, v in self.op_seconds(item).items():
          item[k] += v
      for k, v in item.items():
        acc[k] += v
    self._memo[key] = dict(acc)
    return self._memo[key]

  def own(self, ins: Instr, shapes: Mapping[str, str], fused: bool, comp: str = "") -> Dict[str, float]:
    op, out = ins.op, {}
    if op == "convolution":
      out["mxu_flops"] = conv_flops(ins, shapes)
    elif op == "dot":
      out["mxu_flops"] = dot_flops(ins, shapes)
    elif op in ELEMENTWISE:
      out["transcendentals" if op in TRANSCENDENTAL else "vpu_flops"] = elements(ins.shape)
    elif op in ("reduce", "reduce-window") and ins.operands:
      n_in = elements(shapes.get(ins.operands[0], ""))
      out["vpu_flops"] = max(0.0, n_in - elements(ins.shape)) if op == "reduce" else elements(ins.shape)
    elif op in ("gather", "scatter"):
      moved = ins.shape if op == "gather" else shapes.get(ins.operands[-1], "")
      out["gather_bytes"] = nbytes(moved)
    elif op == "custom-call" and "tpu_custom_call" in ins.attrs:
      out.update(kernel_cost(ins))
    base = op.replace("-start", "")
    if base == "all-reduce" and "all-reduce-scatter" in comp:
      base = "reduce-scatter"  # TPU's reduce-scatter fusions wrap an all-reduce in such a computation
    if base in COLLECTIVES:
      res = arrays(ins.shape)
      if op.endswith("-start"):
        res = res[len(res) // 2:]
      out["collective_bytes"] = float(sum(math.prod(d) * _DTYPE_BYTES[t] for t, d in res))
      out[f"collective/{base}"] = out["collective_bytes"]
    if not fused and op not in _NO_BYTES and base not in COLLECTIVES and "AsyncCollective" not in ins.attrs:
      if op == "fusion":
        out["hbm_bytes"] = _fusion_bytes(self.module, ins, shapes)
      elif op == "custom-call" and "tpu_custom_call" in ins.attrs:
        out["hbm_bytes"] = out.get("kernel_bytes", 0.0)
      else:
        out["hbm_bytes"] = sum(nbytes(shapes.get(o, "")) for o in ins.operands) + nbytes(ins.shape)
    return out


def _label(body: List[Instr]) -> str:
  """Where a loop comes from: the most common op_name prefix before '/while/body' in its body."""
  names = collections.Counter()
  for ins in body:
    m = re.search(r'op_name="([^"]*?)/while/body', ins.attrs)
    if m:
      names[m.group(1)] += 1
  return names.most_common(1)[0][0] if names else ""


def analyse(text: str, count_trips: bool = True, op_seconds=None) -> Analysis:
  return Analysis(parse(text), count_trips, op_seconds)
