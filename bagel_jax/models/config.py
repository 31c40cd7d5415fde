"""Model configuration: architecture dataclasses and named presets.

Configs are frozen dataclasses so they can be passed to `jax.jit` as static arguments and hashed. The
architecture fields mirror the official `llm_config.json` / `vit_config.json` / FLUX `AutoEncoderParams`;
the implementation knobs (dtype, attention kernel, remat, scan) live in `BagelConfig` beside them because
every module reads them, but they never change the parameter tree.
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Tuple

from bagel_jax.models import variants

LAYER_VARIANTS = variants.NAMES  # one module each under models/variants/
ATTENTION_IMPLS = ("reference", "tiled", "pallas", "pallas_interpret", "auto")
REMAT_POLICIES = ("none", "full", "nothing_saveable", "dots_saveable", "dots_with_no_batch_dims_saveable",
                  "minimal", "offload_layer_inputs")
ROUTING_MODES = ("capacity", "dense")


def _check_choice(obj, name, choices):
  value = getattr(obj, name)
  if value not in choices:
    raise ValueError(f"{type(obj).__name__}.{name}={value!r} is not one of {choices}")


def _check_positive(obj, *names):
  for name in names:
    value = getattr(obj, name)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
      raise ValueError(f"{type(obj).__name__}.{name} must be a positive int, got {value!r}")


@dataclasses.dataclass(frozen=True)
class LLMConfig:
  """Qwen2-style decoder. `layer_variant` picks dense / moe (FFN expert) / mot (all-parameter expert) /
  moe_topk (learned token-choice router over `num_experts` FFNs)."""
  vocab_size: int
  hidden_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  intermediate_size: int
  rope_theta: float = 1e6
  rms_norm_eps: float = 1e-6
  qk_norm: bool = True
  layer_variant: str = "mot"
  # moe_topk only.
  num_experts: int = 2
  experts_per_token: int = 1
  expert_intermediate_size: Optional[int] = None  # None: same as intermediate_size.
  capacity_factor: float = 1.25
  router_aux_loss_weight: float = 0.01
  # Special-token ids (Qwen2.5 values by default; tiny tokenizers override them).
  bos_token_id: int = 151644  # <|im_start|>
  eos_token_id: int = 151645  # <|im_end|>
  vision_start_token_id: int = 151652
  vision_end_token_id: int = 151653

  def __post_init__(self):
    _check_positive(self, "vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
                    "intermediate_size", "num_experts", "experts_per_token")
    _check_choice(self, "layer_variant", tuple(variants.REGISTRY))
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"LLMConfig.num_heads={self.num_heads} must be a multiple of "
                       f"num_kv_heads={self.num_kv_heads} (GQA)")
    if self.head_dim % 2:
      raise ValueError(f"LLMConfig.head_dim={self.head_dim} must be even (split-half RoPE)")
    if self.experts_per_token > self.num_experts:
      raise ValueError(f"LLMConfig.experts_per_token={self.experts_per_token} exceeds num_experts="
                       f"{self.num_experts}")
    if self.capacity_factor <= 0:
      raise ValueError(f"LLMConfig.capacity_factor must be > 0, got {self.capacity_factor}")

  @property
  def num_modality_experts(self) -> int:
    """How many hard-routed weight sets (und, gen) the layers stack: 1 for dense/moe_topk, 2 otherwise."""
    return variants.get(self.layer_variant).experts.most

  @property
  def moe_intermediate_size(self) -> int:
    return self.expert_intermediate_size or self.intermediate_size


@dataclasses.dataclass(frozen=True)
class ViTConfig:
  """SigLIP NaViT encoder. `num_layers` is the number of layers *run* (26 of the 27 stored for BAGEL)."""
  hidden_size: int
  intermediate_size: int
  num_heads: int
  num_layers: int
  patch_size: int = 14
  max_patches_per_side: int = 70
  num_channels: int = 3
  layer_norm_eps: float = 1e-6

  def __post_init__(self):
    _check_positive(self, "hidden_size", "intermediate_size", "num_heads", "num_layers", "patch_size",
                    "max_patches_per_side", "num_channels")
    if self.hidden_size % self.num_heads:
      raise ValueError(f"ViTConfig.hidden_size={self.hidden_size} must be divisible by num_heads="
                       f"{self.num_heads}")

  @property
  def patch_dim(self) -> int:
    return self.patch_size * self.patch_size * self.num_channels

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_heads


@dataclasses.dataclass(frozen=True)
class VAEConfig:
  """FLUX (BFL) AutoEncoder. Downsampling factor is 2**(len(ch_mult)-1)."""
  ch: int = 128
  ch_mult: Tuple[int, ...] = (1, 2, 4, 4)
  num_res_blocks: int = 2
  z_channels: int = 16
  in_channels: int = 3
  out_channels: int = 3
  scale_factor: float = 0.3611
  shift_factor: float = 0.1159
  num_groups: int = 32
  eps: float = 1e-6

  def __post_init__(self):
    _check_positive(self, "ch", "num_res_blocks", "z_channels", "in_channels", "out_channels", "num_groups")
    if not self.ch_mult or any((not isinstance(m, int)) or m <= 0 for m in self.ch_mult):
      raise ValueError(f"VAEConfig.ch_mult must be a non-empty tuple of positive ints, got {self.ch_mult!r}")
    for m in self.ch_mult:
      if (self.ch * m) % self.num_groups:
        raise ValueError(f"VAEConfig: channels ch*mult={self.ch * m} not divisible by num_groups="
                         f"{self.num_groups}")

  @property
  def downsample(self) -> int:
    return 2 ** (len(self.ch_mult) - 1)


@dataclasses.dataclass(frozen=True)
class BagelConfig:
  """The composite model plus implementation knobs that do not change the parameter tree."""
  llm: LLMConfig
  vit: ViTConfig
  vae: VAEConfig
  latent_patch_size: int = 2
  max_latent_size: int = 64
  # Implementation (not architecture).
  dtype: str = "float32"          # activation/compute dtype ("bfloat16" on TPU)
  param_dtype: str = "float32"    # master weights
  attention_impl: str = "reference"
  remat_policy: str = "none"
  scan_layers: bool = True
  # Layers per iteration of the layer scan (>= num_layers: one straight-line program over the same stacked
  # parameters). On CPU a fully unrolled stack runs the official-small step ~12% faster (no stacked residual
  # buffers, docs/cpu_performance.md) for ~1.5x the compile time; on TPU keep 1 (compile time, memory).
  scan_unroll: int = 1
  routing: str = "capacity"       # MoT/MoE dispatch: fixed-capacity buffers, or "dense" (test oracle, 2x FLOPs)
  ce_chunk_size: int = 0          # >0: compute lm_head+CE over the CE buffer in chunks of this many tokens
  freeze_und: bool = False        # official `freeze_und`: und rows detached so only gen parameters learn

  def __post_init__(self):
    _check_positive(self, "latent_patch_size", "max_latent_size", "scan_unroll")
    _check_choice(self, "attention_impl", ATTENTION_IMPLS)
    _check_choice(self, "remat_policy", REMAT_POLICIES)
    _check_choice(self, "routing", ROUTING_MODES)
    for name in ("dtype", "param_dtype"):
      if getattr(self, name) not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"BagelConfig.{name}={getattr(self, name)!r} is not a float dtype name")
    if self.freeze_und and self.llm.layer_variant != "mot":
      raise ValueError("BagelConfig.freeze_und needs llm.layer_variant='mot' (it detaches the und expert)")
    if self.ce_chunk_size < 0:
      raise ValueError(f"BagelConfig.ce_chunk_size must be >= 0, got {self.ce_chunk_size}")

  @property
  def latent_channels(self) -> int:
    """Width of one latent token: p*p*z (64 for FLUX with 2x2 patches)."""
    return self.latent_patch_size ** 2 * self.vae.z_channels

  @property
  def latent_downsample(self) -> int:
    """Pixels per latent token side (16 for FLUX f=8 with 2x2 patches)."""
    return self.vae.downsample * self.latent_patch_size

  def replace(self, **kw) -> "BagelConfig":
    return dataclasses.replace(self, **kw)

  def replace_llm(self, **kw) -> "BagelConfig":
    return dataclasses.replace(self, llm=dataclasses.replace(self.llm, **kw))


# ----------------------------------------------------------------------------------------------------------
# Presets.
# ----------------------------------------------------------------------------------------------------------

# Vocabulary of the built-in synthetic tokenizer: ids 0..3 are reserved for the four special roles.
TINY_SPECIAL_IDS = dict(bos_token_id=1, eos_token_id=2, vision_start_token_id=3, vision_end_token_id=4)


def tiny(variant: str = "mot", **kw) -> BagelConfig:
  """Runs a full forward+backward in seconds on one CPU core."""
  llm = LLMConfig(vocab_size=512, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
                  intermediate_size=128, layer_variant=variant, expert_intermediate_size=None,
                  **TINY_SPECIAL_IDS)
  vit = ViTConfig(hidden_size=32, intermediate_size=64, num_heads=2, num_layers=1, patch_size=8,
                  max_patches_per_side=8)
  vae = VAEConfig(ch=16, ch_mult=(1, 2, 2), num_res_blocks=1, z_channels=4, num_groups=8)
  return BagelConfig(llm=llm, vit=vit, vae=vae, latent_patch_size=2, max_latent_size=16, **kw)


def small(variant: str = "mot", **kw) -> BagelConfig:
  """~100M parameters per expert path: the CPU benchmark size."""
  llm = LLMConfig(vocab_size=32768, hidden_size=768, num_layers=8, num_heads=12, num_kv_heads=4, head_dim=64,
                  intermediate_size=2048, layer_variant=variant, **TINY_SPECIAL_IDS)
  vit = ViTConfig(hidden_size=384, intermediate_size=1536, num_heads=6, num_layers=6, patch_size=14,
                  max_patches_per_side=32)
  vae = VAEConfig(ch=32, ch_mult=(1, 2, 4, 4), num_res_blocks=1, z_channels=16)
  return BagelConfig(llm=llm, vit=vit, vae=vae, latent_patch_size=2, max_latent_size=32, **kw)


def official_small(variant: str = "mot", **kw) -> BagelConfig:
  """The model of the CPU-speed comparison with the official PyTorch code (51,916,608 trainable parameters
  as MoT): Qwen2-style 8 x 512 with GQA 8/2, a 2-layer ViT (patch 14, 8 x 8 patches), a 2x-downsampling VAE
  with z=16 and 2x2 latent patches (64-px images -> 16 x 16 latent tokens)."""
  llm = LLMConfig(vocab_size=4096, hidden_size=512, num_layers=8, num_heads=8, num_kv_heads=2, head_dim=64,
                  intermediate_size=1408, layer_variant=variant, **TINY_SPECIAL_IDS)
  vit = ViTConfig(hidden_size=256, intermediate_size=1024, num_heads=4, num_layers=2, patch_size=14,
                  max_patches_per_side=8)
  vae = VAEConfig(ch=32, ch_mult=(1, 1), num_res_blocks=1, z_channels=16)
  return BagelConfig(llm=llm, vit=vit, vae=vae, latent_patch_size=2, max_latent_size=16, **kw)


def _siglip_so400m() -> ViTConfig:
  return ViTConfig(hidden_size=1152, intermediate_size=4304, num_heads=16, num_layers=26, patch_size=14,
                   max_patches_per_side=70)


def bagel_1_5b(variant: str = "mot", **kw) -> BagelConfig:
  """Qwen2.5-1.5B backbone (the paper's ablation size); untied head as BAGEL always sets."""
  llm = LLMConfig(vocab_size=151936, hidden_size=1536, num_layers=28, num_heads=12, num_kv_heads=2,
                  head_dim=128, intermediate_size=8960, layer_variant=variant)
  return BagelConfig(llm=llm, vit=_siglip_so400m(), vae=VAEConfig(), latent_patch_size=2, max_latent_size=64,
                     **kw)


def bagel_7b(variant: str = "mot", **kw) -> BagelConfig:
  """The released BAGEL-7B-MoT shapes (Qwen2.5-7B + SigLIP so400m/14 NaViT + FLUX AE)."""
  llm = LLMConfig(vocab_size=152064, hidden_size=3584, num_layers=28, num_heads=28, num_kv_heads=4,
                  head_dim=128, intermediate_size=18944, layer_variant=variant)
  return BagelConfig(llm=llm, vit=_siglip_so400m(), vae=VAEConfig(), latent_patch_size=2, max_latent_size=64,
                     **kw)


PRESETS = {"tiny": tiny, "small": small, "official_small": official_small, "bagel_1_5b": bagel_1_5b,
           "bagel_7b": bagel_7b}


def get_preset(name: str, variant: str = "mot", **kw) -> BagelConfig:
  if name not in PRESETS:
    raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
  return PRESETS[name](variant, **kw)


# ----------------------------------------------------------------------------------------------------------
# Serialisation (checkpoints store the model config beside the weights).
# ----------------------------------------------------------------------------------------------------------

def to_dict(config: BagelConfig) -> dict:
  return dataclasses.asdict(config)


def from_dict(d: dict) -> BagelConfig:
  """Inverse of `to_dict`; unknown keys raise so a config from another version is not silently misread."""
  def build(cls, values):
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
      raise ValueError(f"{cls.__name__}: unknown config keys {unknown}")
    return values
  d = dict(d)
  llm = LLMConfig(**build(LLMConfig, d.pop("llm")))
  vit = ViTConfig(**build(ViTConfig, d.pop("vit")))
  vae_d = dict(build(VAEConfig, d.pop("vae")))
  vae_d["ch_mult"] = tuple(vae_d.get("ch_mult", VAEConfig.ch_mult))
  vae = VAEConfig(**vae_d)
  return BagelConfig(llm=llm, vit=vit, vae=vae, **build(BagelConfig, d))


def architecture(config: BagelConfig) -> dict:
  """The fields that determine the parameter tree (implementation knobs dropped, except scan_layers which
  changes the tree's layout)."""
  d = to_dict(config)
  for k in ("dtype", "attention_impl", "remat_policy", "routing", "ce_chunk_size", "freeze_und", "scan_unroll"):
    d.pop(k)
  return d
