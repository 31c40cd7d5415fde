"""Write a JSONL manifest from a folder of images, so nobody hand-writes records (docs/data.md).

Two layouts:

  # images/ + a captions file: TSV/CSV (file, caption; a header row is optional), JSONL ({"file"|"image",
  # "caption"|"text"|"captions"}), or no file at all and one sidecar `<image>.txt` caption per image.
  # Several captions for one file (repeated rows, or a list) become one t2i record; one is drawn per sample.
  python -m bagel_jax.data.manifest captions --images data/images --captions data/captions.tsv --out data/t2i.jsonl

  # one folder per class: data/classes/<label>/*.png; the caption is --template with {label} filled in,
  # and --vqa-out also writes a VQA manifest (--question, answer = the label).
  python -m bagel_jax.data.manifest classes --root data/classes --template "a photo of a {label}" \
      --out data/t2i.jsonl --vqa-out data/vqa.jsonl

  # no folder yet? a small example one to try the path with: drawn digits in colours, images/ + captions.tsv
  python -m bagel_jax.data.manifest example --dir workdirs/example_data

Image paths in the records are relative to the manifest's directory (the rule `JsonlSource` resolves them by),
so a data folder can be moved with its manifest. `--holdout N` writes the last N records (in a seeded shuffled
order) to `<out stem>_heldout.jsonl` instead (VAE PSNR, evaluation). `--check` opens every image with Pillow
and leaves out (and reports) those that do not decode. Labels in folder names have '_' and '-' read as spaces.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import random
from typing import Dict, List, Optional, Sequence, Tuple

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")


def _is_image(name: str) -> bool:
  return name.lower().endswith(IMAGE_EXTS)


def _read_captions(path: str) -> Dict[str, List[str]]:
  """file name (as written in the captions file) -> captions, in file order."""
  out: Dict[str, List[str]] = {}

  def add(name, caps):
    caps = [caps] if isinstance(caps, str) else list(caps or [])
    out.setdefault(str(name).strip(), []).extend(c.strip() for c in caps if isinstance(c, str) and c.strip())

  with open(path, encoding="utf-8") as f:
    if path.lower().endswith((".jsonl", ".json")):
      for n, line in enumerate(f, 1):
        if not line.strip():
          continue
        try:
          rec = json.loads(line)
        except json.JSONDecodeError as e:
          raise ValueError(f"{path}:{n}: not JSON ({e})") from e
        name = rec.get("file", rec.get("image"))
        caps = rec.get("captions", rec.get("caption", rec.get("text")))
        if name is None or caps is None:
          raise ValueError(f"{path}:{n}: needs 'file' (or 'image') and 'caption' (or 'text' / 'captions')")
        add(name, caps)
      return out
    delim = "," if path.lower().endswith(".csv") else "\t"
    rows = list(csv.reader(f, delimiter=delim))
  if rows and [c.strip().lower() for c in rows[0][:2]] in (["file", "caption"], ["image", "caption"],
                                                           ["file", "text"], ["image", "text"]):
    rows = rows[1:]
  for n, row in enumerate(rows, 1):
    if not row or not "".join(row).strip():
      continue
    if len(row) < 2:
      raise ValueError(f"{path}:{n}: expected 'file{delim!r}caption', got {row!r}")
    add(row[0], delim.join(row[1:]))
  return out


def _check_image(path: str) -> Optional[str]:
  from PIL import Image  # pylint: disable=import-outside-toplevel
  try:
    with Image.open(path) as im:
      im.load()
  except Exception as e:  # pylint: disable=broad-except
    return f"{type(e).__name__}: {e}"
  return None


def captions_records(images_dir: str, captions: str = "") -> Tuple[List[Tuple[str, List[str]]], List[str]]:
  """[(image path, captions)] and problems (images without a caption, captions without an image)."""
  images_dir = os.path.abspath(images_dir)
  problems: List[str] = []
  pairs: List[Tuple[str, List[str]]] = []
  if captions:
    caps = _read_captions(captions)
    for name, texts in caps.items():
      path = name if os.path.isabs(name) else os.path.join(images_dir, name)
      if not os.path.isfile(path):
        problems.append(f"{name}: captioned in {captions} but not found under {images_dir}")
      elif not texts:
        problems.append(f"{name}: empty caption")
      else:
        pairs.append((path, texts))
  else:
    for root, _, files in os.walk(images_dir):
      for name in sorted(files):
        if not _is_image(name):
          continue
        path = os.path.join(root, name)
        side = os.path.splitext(path)[0] + ".txt"
        if not os.path.isfile(side):
          problems.append(f"{os.path.relpath(path, images_dir)}: no caption file {os.path.basename(side)}")
          continue
        with open(side, encoding="utf-8") as f:
          texts = [line.strip() for line in f if line.strip()]
        if texts:
          pairs.append((path, texts))
        else:
          problems.append(f"{os.path.relpath(side, images_dir)}: empty caption")
  pairs.sort()
  return pairs, problems


def class_records(root: str) -> List[Tuple[str, str]]:
  """[(image path, label)] of a folder-per-class layout, sorted by label then file."""
  root = os.path.abspath(root)
  out = []
  for cls in sorted(os.listdir(root)):
    d = os.path.join(root, cls)
    if not os.path.isdir(d):
      continue
    label = cls.replace("_", " ").replace("-", " ").strip()
    for dirpath, _, files in os.walk(d):
      for name in sorted(files):
        if _is_image(name):
          out.append((os.path.join(dirpath, name), label))
  if not out:
    raise ValueError(f"{root}: no images found in class sub-folders (expected {root}/<label>/*.png)")
  return out


def write_jsonl(records: Sequence[dict], out: str) -> str:
  """Writes records whose `images` are absolute paths, made relative to the manifest's directory."""
  out = os.path.abspath(out)
  base = os.path.dirname(out)
  os.makedirs(base, exist_ok=True)
  tmp = out + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    for r in records:
      r = dict(r, images=[os.path.relpath(p, base) for p in r["images"]])
      f.write(json.dumps(r, ensure_ascii=False) + "\n")
  os.replace(tmp, out)
  return out


def _split(items: list, holdout: int, seed: int) -> Tuple[list, list]:
  if holdout <= 0:
    return items, []
  if holdout >= len(items):
    raise ValueError(f"--holdout {holdout} leaves no training records (there are {len(items)})")
  order = list(range(len(items)))
  random.Random(seed).shuffle(order)
  held = set(order[-holdout:])
  return [x for i, x in enumerate(items) if i not in held], [x for i, x in enumerate(items) if i in held]


def heldout_path(out: str) -> str:
  stem, ext = os.path.splitext(out)
  return f"{stem}_heldout{ext or '.jsonl'}"


def make_manifests(layout: str, out: str, *, images: str = "", captions: str = "", root: str = "",
                   template: str = "a photo of a {label}", vqa_out: str = "",
                   question: str = "what is in the image?", holdout: int = 0, seed: int = 0,
                   check: bool = False) -> Dict[str, object]:
  """The library entry point of the CLI; returns a summary dict (paths written, counts, problems)."""
  problems: List[str] = []
  if layout == "captions":
    if not images:
      raise ValueError("captions layout needs --images DIR")
    pairs, problems = captions_records(images, captions)
    items = [(p, texts, None) for p, texts in pairs]
  elif layout == "classes":
    if not root:
      raise ValueError("classes layout needs --root DIR")
    if "{label}" not in template:
      raise ValueError(f"--template {template!r} must contain {{label}}")
    items = [(p, [template.format(label=label)], label) for p, label in class_records(root)]
  else:
    raise ValueError(f"unknown layout {layout!r} (captions or classes)")
  if check:
    kept = []
    for it in items:
      err = _check_image(it[0])
      if err:
        problems.append(f"{it[0]}: does not decode ({err})")
      else:
        kept.append(it)
    items = kept
  if not items:
    raise ValueError("no records to write:\n  " + "\n  ".join(problems[:20]))
  train, held = _split(items, holdout, seed)
  summary: Dict[str, object] = {"problems": problems}
  for part, path in ((train, out), (held, heldout_path(out) if held else "")):
    if not path:
      continue
    summary[path] = len(part)
    write_jsonl([dict(kind="t2i", texts=texts, images=[p]) for p, texts, _ in part], path)
    if vqa_out and layout == "classes":
      vpath = vqa_out if path == out else heldout_path(vqa_out)
      write_jsonl([dict(kind="vqa", texts=[question, label], images=[p]) for p, _, label in part], vpath)
      summary[vpath] = len(part)
  return summary


EXAMPLE_COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (50, 70, 220), "orange": (240, 140, 20)}
EXAMPLE_DIGITS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def write_example_folder(directory: str, n: int = 120, size: int = 32, seed: int = 0) -> str:
  """n images of a digit (Pillow's default font, scaled up, jittered) in one of four colours on a light
  background, and captions.tsv ('a red digit seven'); returns the captions path."""
  import numpy as np  # pylint: disable=import-outside-toplevel
  from PIL import Image, ImageDraw  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(seed)
  os.makedirs(os.path.join(directory, "images"), exist_ok=True)
  rows = ["file\tcaption"]
  for i in range(n):
    d, color = i % 10, list(EXAMPLE_COLORS)[(i // 10) % len(EXAMPLE_COLORS)]
    small = Image.new("RGB", (8, 12), (245, 245, 240))
    ImageDraw.Draw(small).text((1, 0), str(d), fill=EXAMPLE_COLORS[color])
    glyph = small.resize((size * 2 // 3, size), Image.NEAREST)
    canvas = Image.new("RGB", (size, size), (245, 245, 240))
    canvas.paste(glyph, (int(rng.integers(0, size // 3 + 1)), 0))
    name = f"{i:04d}.png"
    canvas.save(os.path.join(directory, "images", name))
    rows.append(f"{name}\ta {color} digit {EXAMPLE_DIGITS[d]}")
  path = os.path.join(directory, "captions.tsv")
  with open(path, "w", encoding="utf-8") as f:
    f.write("\n".join(rows) + "\n")
  return path


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("layout", choices=("captions", "classes", "example"))
  ap.add_argument("--out", default="", help="the t2i manifest to write (.jsonl)")
  ap.add_argument("--dir", default="", help="example: the folder to write images/ and captions.tsv into")
  ap.add_argument("--count", type=int, default=120, help="example: number of images")
  ap.add_argument("--images", default="", help="captions layout: the images folder")
  ap.add_argument("--captions", default="", help="captions layout: TSV/CSV/JSONL captions file (default: "
                  "a sidecar <image>.txt per image)")
  ap.add_argument("--root", default="", help="classes layout: folder of one sub-folder per class")
  ap.add_argument("--template", default="a photo of a {label}", help="classes layout: caption template")
  ap.add_argument("--vqa-out", default="", help="classes layout: also write a VQA manifest here")
  ap.add_argument("--question", default="what is in the image?", help="classes layout: the VQA question")
  ap.add_argument("--holdout", type=int, default=0, help="records written to <out>_heldout.jsonl instead")
  ap.add_argument("--seed", type=int, default=0, help="seed of the held-out draw")
  ap.add_argument("--check", action="store_true", help="decode every image; leave out those that fail")
  args = ap.parse_args(argv)
  if args.layout == "example":
    if not args.dir:
      ap.error("example needs --dir")
    path = write_example_folder(args.dir, args.count)
    print(f"wrote {args.count} images to {os.path.join(args.dir, 'images')} and their captions to {path}")
    return
  if not args.out:
    ap.error("--out is required")
  try:
    summary = make_manifests(args.layout, args.out, images=args.images, captions=args.captions, root=args.root,
                             template=args.template, vqa_out=args.vqa_out, question=args.question,
                             holdout=args.holdout, seed=args.seed, check=args.check)
  except (ValueError, OSError) as e:
    ap.exit(2, f"bagel_jax.data.manifest: error: {e}\n")
  problems = summary.pop("problems")
  for path, n in summary.items():
    print(f"wrote {n} records to {path}")
  if problems:
    print(f"{len(problems)} image(s) left out:")
    for p in problems[:20]:
      print(f"  {p}")
    if len(problems) > 20:
      print(f"  ... and {len(problems) - 20} more")


if __name__ == "__main__":
  main()
