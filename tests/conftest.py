"""Test session set-up: CPU only, deterministic, fp32 matmuls."""
import os

# Set before jax is imported anywhere. AOT tests that need libtpu run in a subprocess with their own env.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# Tiny configs pretrain their VAE once per machine (cached); tests use a short pretraining (see vae_pretrain).
os.environ.setdefault("BAGEL_JAX_VAE_STEPS", "200")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
