"""Per-block LLO compile time from a libtpu log written with
  TPU_STDERR_LOG_LEVEL=0 TPU_MIN_LOG_LEVEL=0 TPU_VMODULE=deepsea_compiler_backend=3
Each block (a fusion, or `<no-hlo-instruction>`: the top-level program that sequences them) is timed from its
"LLO optimizing N instructions" line to its "non-empty bundle count" line on the same thread, with the register
allocator's share. Usage: python llo_timings.py LOG [top-n]"""
import re
import sys

ts = re.compile(r"^[IWE]\d{4} (\d+):(\d+):([\d.]+) +(\d+) ")
start = re.compile(r"\] \[([^\]]+)\] LLO optimizing ([\d,]+) instructions")
done = re.compile(r"non-empty bundle count: (\d+)")
open_blocks, rows = {}, []
for line in open(sys.argv[1], errors="replace"):
  m = ts.match(line)
  if not m:
    continue
  t, thread = int(m[1]) * 3600 + int(m[2]) * 60 + float(m[3]), m[4]
  s = start.search(line)
  if s:
    open_blocks[thread] = [s[1], int(s[2].replace(",", "")), t, None]
    continue
  if thread in open_blocks and "Done with Register Allocator" in line:
    open_blocks[thread][3] = t
  d = done.search(line)
  if d and thread in open_blocks:
    name, n_instr, t0, t_ra = open_blocks.pop(thread)
    rows.append((t - t0, name, n_instr, int(d[1]), (t_ra or t) - t0))
print(f"{len(rows)} blocks, {sum(r[0] for r in rows):.1f} thread-seconds")
print(f"{'seconds':>8} {'to regalloc':>11} {'LLO instr':>10} {'bundles':>8}  block")
for r in sorted(rows, reverse=True)[:int(sys.argv[2]) if len(sys.argv) > 2 else 15]:
  print(f"{r[0]:8.1f} {r[4]:11.1f} {r[2]:10,d} {r[3]:8,d}  {r[1]}")
