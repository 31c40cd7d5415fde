"""Pretrain the tiny model's frozen VAE on your own images (the stand-in for FLUX's AE at CPU scale).

  bagel-train --config experiments/own_data/vae.py:manifest=data/t2i.jsonl,steps=2000 --workdir workdirs/vae
  bagel-train --config experiments/own_data/t2i.py:manifest=data/t2i.jsonl,vae=workdirs/vae --workdir workdirs/t2i

The recipe of `bagel_jax.train.vae_pretrain` (reconstruction MSE + latent statistics, Adam, cosine decay) on
every image of the manifests, squared (centre crop) to image_size. Writes Orbax checkpoints (resumable: rerun
the same command), metrics.jsonl/csv, loss_curves.png, eval.json (PSNR of held-out reconstructions at every
checkpoint) and recon_grid.png (held-out images over their reconstructions).

Args: manifest (required; several joined with '+'), heldout (manifests of held-out images; default: `holdout`
images drawn from the manifest and left out of training), holdout, steps, image_size, batch_size, lr, seed,
init ('random', or 'synthetic' to start from the AE pretrained on synthetic renders), preset, checkpoint_every,
log_every.
"""
import ml_collections

from experiments import common
from experiments.own_data import _builder


def get_config(arg=None):
  arg = common.parse_arg(arg, manifest="", heldout="", holdout=common.Arg(64, min=0),
                         steps=common.Arg(2000, min=1), image_size=common.Arg(32, min=8),
                         batch_size=common.Arg(16, min=1), lr=common.Arg(5e-3, min=0.0), seed=common.Arg(0, min=0),
                         init=common.Arg("random", choices=("random", "synthetic")), preset="tiny",
                         checkpoint_every=common.Arg(0, min=0), log_every=common.Arg(50, min=1))
  paths = _builder.manifests(arg.manifest, "manifest")
  held = _builder.manifests(arg.heldout, "heldout") if arg.heldout else []
  import os  # pylint: disable=import-outside-toplevel
  return ml_collections.ConfigDict(dict(
      recipe="vae", name="own_data_vae", seed=arg.seed, distributed=common.base_config().distributed,
      model=dict(preset=arg.preset),
      init=dict(vae=arg.init),
      data=dict(manifests=tuple(os.path.abspath(p) for p in paths), heldout=tuple(os.path.abspath(p) for p in held),
                holdout=arg.holdout, image_size=arg.image_size),
      optim=dict(lr=arg.lr, warmup_steps=50, clip_norm=1.0),
      train=dict(steps=arg.steps, batch_size=arg.batch_size, log_every=arg.log_every,
                 checkpoint_every=arg.checkpoint_every or max(arg.steps // 4, 1), keep_checkpoints=2,
                 grid_images=12)))
