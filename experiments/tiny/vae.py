"""The tiny preset's frozen VAE, pretrained on renders of the built-in synthetic data (the CPU stand-in for
FLUX's AE; recipe in bagel_jax/train/vae_pretrain.py).

  bagel-train --config experiments/tiny/vae.py --workdir workdirs/tiny_vae
  bagel-train --config experiments/bagel_7b/pretrain.py:model=tiny --workdir W --config.init.vae=workdirs/tiny_vae

Writes W/checkpoints/<steps> (what `init.vae=W` loads), eval.json (PSNR of held-out renders) and recon_grid.png.
`init.vae="synthetic"`, the tiny recipes' default, is this run at these defaults, cached once per machine.

Args: steps, image_size (px, a multiple of the VAE's downsample), batch_size, seed, preset.
"""
import ml_collections

from bagel_jax.train import vae_pretrain
from experiments import common


def get_config(arg=None):
  arg = common.parse_arg(arg, steps=common.Arg(vae_pretrain.DEFAULT_STEPS, min=1), image_size=common.Arg(32, min=8),
                         batch_size=common.Arg(vae_pretrain.DEFAULT_BATCH, min=1), seed=common.Arg(0, min=0),
                         preset="tiny")
  return ml_collections.ConfigDict(dict(
      recipe="vae", name="tiny_vae", seed=arg.seed, distributed=common.base_config().distributed,
      model=dict(preset=arg.preset),
      data=dict(source="synthetic", image_size=arg.image_size),
      train=dict(steps=arg.steps, batch_size=arg.batch_size, log_every=50, grid_images=12)))
