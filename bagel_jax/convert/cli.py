"""`bagel-convert`: released checkpoints in and out of our checkpoint format (docs/conversion.md).

  bagel-convert bagel   --src RELEASE_DIR --dst CKPT            official BAGEL release -> ours
  bagel-convert qwen2   --src HF_DIR --dst CKPT [--vit DIR] [--vae AE]   Qwen2/Qwen2.5 (+ SigLIP, FLUX AE) -> ours
  bagel-convert siglip  --src HF_DIR --dst CKPT (--preset P | --into CKPT)
  bagel-convert flux-ae --src ae.safetensors|DIFFUSERS_DIR --dst CKPT (--preset P | --into CKPT)
  bagel-convert export  --checkpoint CKPT --dst RELEASE_DIR     ours -> official naming

Input errors (missing files or tensors, shape mismatches, truncated files) print one line and exit 1;
nothing is left at --dst.
"""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from bagel_jax.accelerators import use_cpu_if_no_accelerator
from bagel_jax.models import config as config_lib


def _add_common(p: argparse.ArgumentParser, dst_help: str = "output checkpoint directory (must not exist)") -> None:
  p.add_argument("--dst", required=True, help=dst_help)
  p.add_argument("--overwrite", action="store_true", help="replace --dst if it exists (after a successful write)")
  p.add_argument("--quiet", action="store_true", help="no progress bars or summary")


def _add_target(p: argparse.ArgumentParser) -> None:
  p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                 help="parameter dtype written (bf16 sources widen exactly to float32)")
  p.add_argument("--no-scan-layers", dest="scan_layers", action="store_false",
                 help="unstacked per-layer parameters (config.scan_layers=False)")
  p.add_argument("--mesh", default=None, metavar="AXIS=SIZE,...",
                 help="place leaves as sharded arrays on a device mesh, e.g. fsdp=-1 or fsdp=4,tensor=2 "
                      "(axes of parallel/mesh.py); default: host arrays")
  p.add_argument("--rules", default="default", help="logical-axis rule set of parallel/rules.py for --mesh")


def _add_vae_flags(p: argparse.ArgumentParser) -> None:
  # BFL files carry no VAE config: flag, else the metadata `export` writes, else FLUX's. A diffusers directory's
  # config.json gives all three (the flags still override scale and shift).
  p.add_argument("--vae-scale", type=float, default=None,
                 help="latent scale factor (default: ae.safetensors metadata from our export, else FLUX's 0.3611)")
  p.add_argument("--vae-shift", type=float, default=None,
                 help="latent shift factor (default: ae.safetensors metadata from our export, else FLUX's 0.1159)")
  p.add_argument("--vae-num-groups", type=int, default=None,
                 help="GroupNorm groups (default: ae.safetensors metadata from our export, else FLUX's 32)")


def _add_base(p: argparse.ArgumentParser, default_preset: Optional[str] = None) -> None:
  p.add_argument("--preset", default=default_preset, choices=sorted(config_lib.PRESETS),
                 help="model shapes for the modules not converted, which are initialised as the official training "
                      "starts" + (f" (default {default_preset})" if default_preset else ""))
  p.add_argument("--into", default=None, metavar="CKPT",
                 help="take the modules not converted from this checkpoint instead of --preset")
  p.add_argument("--max-latent-size", type=int, default=None, help="latent grid side (default: the base's)")
  p.add_argument("--seed", type=int, default=0, help="seed of the initialised modules")


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="bagel-convert", description=__doc__.split("\n\n")[0])
  sub = parser.add_subparsers(dest="command", required=True)

  p = sub.add_parser("bagel", help="official BAGEL release directory -> our checkpoint")
  p.add_argument("--src", required=True, help="llm_config.json, vit_config.json, ema/model.safetensors, ae.safetensors")
  p.add_argument("--weights", default=None, help="'ema', 'model' or a .safetensors path (default: ema, else model)")
  p.add_argument("--ae", default=None, help="ae.safetensors path (default: SRC/ae.safetensors)")
  p.add_argument("--variant", choices=("dense", "moe", "mot"), default=None,
                 help="default: inferred from *_moe_gen keys; may only add experts (copy_init_moe)")
  p.add_argument("--max-latent-size", type=int, default=None, help="default: sqrt of latent_pos_embed rows")
  p.add_argument("--vit-layers", type=int, default=None, help="ViT layers run (default: stored - 1)")
  p.add_argument("--vit-grid", type=int, default=None, help="ViT patches per side (default: from the tables)")
  p.add_argument("--no-verify-tables", dest="verify_tables", action="store_false",
                 help="skip checking the stored sin-cos tables against our formula")
  _add_vae_flags(p)
  _add_target(p)
  _add_common(p)

  p = sub.add_parser("qwen2", help="HF Qwen2/Qwen2.5 directory -> our checkpoint (LLM; ViT/VAE optional)")
  p.add_argument("--src", required=True, help="config.json + *.safetensors (sharded index supported)")
  p.add_argument("--variant", choices=("dense", "moe", "mot"), default="mot",
                 help="moe/mot: the gen expert starts as a copy of the und one (default mot)")
  p.add_argument("--no-qk-norm", dest="qk_norm", action="store_false",
                 help="plain Qwen2 attention (BAGEL adds QK-norm, initialised to ones)")
  p.add_argument("--vit", default=None, metavar="SIGLIP_DIR", help="convert the ViT from this SigLIP directory")
  p.add_argument("--vit-layers", type=int, default=None, help="ViT layers run (default: stored - 1)")
  p.add_argument("--vae", default=None, metavar="AE", help="convert the VAE from ae.safetensors or a diffusers dir")
  _add_vae_flags(p)
  _add_base(p, default_preset="bagel_7b")
  _add_target(p)
  _add_common(p)

  p = sub.add_parser("siglip", help="HF SigLIP vision tower -> the ViT of a checkpoint")
  p.add_argument("--src", required=True, help="config.json + *.safetensors")
  p.add_argument("--vit-layers", type=int, default=None, help="layers run (default: stored - 1, as BAGEL)")
  _add_base(p)
  _add_target(p)
  _add_common(p)

  p = sub.add_parser("flux-ae", help="FLUX autoencoder -> the VAE of a checkpoint")
  p.add_argument("--src", required=True, help="ae.safetensors (BFL naming) or a diffusers AutoencoderKL directory")
  _add_vae_flags(p)
  _add_base(p)
  _add_target(p)
  _add_common(p)

  p = sub.add_parser("export", help="our checkpoint -> official BAGEL naming")
  p.add_argument("--checkpoint", required=True, help="our checkpoint directory")
  p.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
  p.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                 help="ema.safetensors dtype (default: the stored one; the release is bfloat16)")
  p.add_argument("--ae-dtype", choices=("float32", "bfloat16"), default="float32",
                 help="ae.safetensors dtype (FLUX ships float32)")
  _add_common(p, "output release directory (must not exist)")
  return parser


def _sharding_fn(mesh_spec: Optional[str], rules_name: str):
  """'fsdp=4,tensor=2' -> f(logical_spec, shape) -> NamedSharding via parallel/rules.py."""
  if not mesh_spec:
    return None
  import jax  # pylint: disable=import-outside-toplevel
  # imported after main() chose the JAX platform (use_cpu_if_no_accelerator): they import JAX
  from bagel_jax.parallel import mesh as mesh_lib, rules as rules_lib  # pylint: disable=import-outside-toplevel
  try:
    ici = {k.strip(): int(v) for k, v in (item.split("=") for item in mesh_spec.split(",") if item.strip())}
  except ValueError as e:
    raise ValueError(f"--mesh {mesh_spec!r}: expected AXIS=SIZE[,AXIS=SIZE...]") from e
  mesh = mesh_lib.create_mesh(ici)
  rules = rules_lib.rules_for_mesh(rules_lib.get_rules(rules_name), mesh)

  def fn(spec, shape):
    return rules_lib.logical_to_sharding(spec, jax.ShapeDtypeStruct(shape, "float32"), mesh, rules)
  return fn


def run(args: argparse.Namespace) -> None:
  # imported after main() chose the JAX platform (use_cpu_if_no_accelerator): they import JAX
  from bagel_jax.convert import bagel as bagel_conv, components  # pylint: disable=import-outside-toplevel
  progress = not args.quiet
  log = (lambda s: None) if args.quiet else (lambda s: print(s, flush=True))
  if args.command == "export":
    files = bagel_conv.export_bagel(args.checkpoint, args.dst, dtype=args.dtype, ae_dtype=args.ae_dtype,
                                    step=args.step, overwrite=args.overwrite, progress=progress)
    log(f"wrote {args.dst}: {', '.join(files)}")
    return
  sharding_fn = _sharding_fn(args.mesh, args.rules)
  vae_kw = dict(scale_factor=getattr(args, "vae_scale", None), shift_factor=getattr(args, "vae_shift", None),
                num_groups=getattr(args, "vae_num_groups", None))  # siglip has no VAE flags
  if args.command == "bagel":
    config = bagel_conv.convert_bagel(
        args.src, args.dst, dtype=args.dtype, weights=args.weights, ae=args.ae, sharding_fn=sharding_fn,
        progress=progress, overwrite=args.overwrite, check_tables=args.verify_tables, log=log,
        variant=args.variant, max_latent_size=args.max_latent_size, vit_layers=args.vit_layers,
        vit_grid=args.vit_grid, vae_scale=args.vae_scale, vae_shift=args.vae_shift,
        vae_num_groups=args.vae_num_groups,
        scan_layers=args.scan_layers)
  else:
    variant = getattr(args, "variant", "mot")
    base = components.base_config(args.preset if args.into is None else None, args.into, variant)
    parts = []
    if args.command == "qwen2":
      parts.append(components.qwen2_part(args.src, variant=variant, qk_norm=args.qk_norm,
                                         scan_layers=args.scan_layers))
      if args.vit:
        parts.append(components.siglip_part(args.vit, vit_layers=args.vit_layers, scan_layers=args.scan_layers))
      if args.vae:
        parts.append(components.flux_part(args.vae, **vae_kw))
    elif args.command == "siglip":
      parts.append(components.siglip_part(args.src, vit_layers=args.vit_layers, scan_layers=args.scan_layers))
    else:
      parts.append(components.flux_part(args.src, **vae_kw))
    config = components.compose_config(base, parts, dtype=args.dtype, max_latent_size=args.max_latent_size,
                                       scan_layers=args.scan_layers)
    components.assemble(args.dst, parts, config, into=args.into, seed=args.seed, dtype=args.dtype,
                        sharding_fn=sharding_fn, progress=progress, overwrite=args.overwrite, log=log)
  log(f"wrote {args.dst} ({config.llm.layer_variant}, {args.dtype})")


def main(argv: Optional[Sequence[str]] = None) -> int:
  use_cpu_if_no_accelerator()  # before JAX picks a backend: no libtpu noise on CPU-only machines
  args = build_parser().parse_args(argv)
  try:
    run(args)
  except (ValueError, OSError) as e:  # input errors: one clear line, no traceback
    print(f"bagel-convert {args.command}: error: {e}", file=sys.stderr)
    raise SystemExit(1) from e
  return 0


if __name__ == "__main__":
  sys.exit(main())
