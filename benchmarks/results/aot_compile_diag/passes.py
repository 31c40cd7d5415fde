import re, sys, collections
tot = collections.Counter(); calls = collections.Counter()
pat = re.compile(r"HLO pass: (\S+) time: ([\d.]+) (us|ms|s)\b")
mul = dict(us=1e-6, ms=1e-3, s=1.0)
first = last = None
tsre = re.compile(r"^[IWE]\d{4} (\d\d):(\d\d):(\d\d\.\d+)")
gaps = []
prev = None
for line in open(sys.argv[1], errors="replace"):
  m = tsre.match(line)
  if m:
    t = int(m.group(1)) * 3600 + int(m.group(2)) * 60 + float(m.group(3))
    if prev is not None and t - prev[0] > 5:
      gaps.append((t - prev[0], prev[1][:160], line[:160]))
    prev = (t, line)
  m = pat.search(line)
  if m:
    tot[m.group(1)] += float(m.group(2)) * mul[m.group(3)]; calls[m.group(1)] += 1
print("total pass seconds", round(sum(tot.values()), 1))
for k, v in tot.most_common(25):
  print(f"{v:8.1f} s  x{calls[k]:4d}  {k}")
print("gaps > 5 s between log lines:")
for g in sorted(gaps, reverse=True)[:15]:
  print(round(g[0], 1), "|", g[1].strip(), "\n      ->", g[2].strip())
