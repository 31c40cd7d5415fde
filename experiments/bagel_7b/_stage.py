"""What the four BAGEL-7B stage files share: their config args and how a recipe is sized. No recipe values
live here; each stage file (align.py, pretrain.py, continued.py, sft.py) spells out its Table 3 column.

Config args: variant (mot/dense/moe/moe_topk), topology (one packed row per chip), slices (DCN data parallel),
model=tiny or runlocal (the CPU recipe), steps, attention, remat (a `models.layers.REMAT_POLICIES` name; default
nothing_saveable, offload_layer_inputs where the row does not fit HBM with 15% headroom: see `needs_offload`),
tokens (tokens per row; default the top of the stage's packing window)."""
from bagel_jax.models.config import LAYER_VARIANTS
from bagel_jax.parallel import topology as topology_lib
from experiments import common

MODELS = ("7b", "tiny")  # model=tiny (or runlocal): the same recipe at CPU scale
# Longest row per chip whose 7B step keeps 15% HBM headroom with every activation in HBM, by chip generation
# (benchmarks/results/aot_7b.json): v6e's 32 GiB holds PT's 36,864 tokens (25.3 GiB, 78.9%) but not CT/SFT's
# 46,080 (29.6 GiB, 92.6%); v5e's 16 GiB holds neither; v5p's 95 GiB holds 131,072 (75.9 GiB, 79.9%).
IN_HBM_MAX_TOKENS = {"v5e": 0, "v6e": 36864}


def needs_offload(topology: str, tokens: int) -> bool:
  """Whether the 7B step must keep each layer's input in host memory (remat offload_layer_inputs) to fit."""
  limit = IN_HBM_MAX_TOKENS.get(topology_lib.generation(topology))
  return limit is not None and tokens > limit


def parse(arg):
  return common.parse_arg(arg, variant=common.Arg("mot", choices=LAYER_VARIANTS), topology="v5p-256",
                          model=common.Arg("7b", choices=MODELS), runlocal=False, steps=common.Arg(0, min=1),
                          slices=common.Arg(1, min=1), attention="pallas", remat="", tokens=common.Arg(0, min=512))


def sized(c, arg, *, tokens: int):
  """The recipe `c` (its Table 3 values set) at the size `arg` asks for: BAGEL-7B on a TPU slice with rows of
  `tokens` (the top of the stage's packing window unless `tokens=` is given), or the tiny model on CPU."""
  if arg.steps:
    c.train.steps = c.optim.total_steps = arg.steps
  if arg.runlocal or arg.model == "tiny":
    # The same recipe at CPU scale on the built-in synthetic data, weighted by the stage's category ratios.
    common.tiny_cpu(c, variant=arg.variant, ratios=dict(c.stage_mix.ratios))
    c.train.steps = c.optim.total_steps = arg.steps or 300
    c.optim.warmup_steps = min(c.optim.warmup_steps, c.train.steps // 10)
    c.optim.lr = max(c.optim.lr, 1e-3)  # tiny models take a larger step than 7B
    if c.optim.ema_decay:
      c.optim.ema_decay = 0.99  # an EMA horizon of ~100 steps suits runs of a few hundred steps
    return c
  row = arg.tokens or tokens
  # the host link carries 2 x 6.9 GiB per step and chip when the layer inputs are offloaded: only where needed
  remat = arg.remat or ("offload_layer_inputs" if needs_offload(arg.topology, row) else "nothing_saveable")
  c.model.update(dict(preset="bagel_7b", variant=arg.variant, dtype="bfloat16", attention_impl=arg.attention,
                      remat_policy=remat, ce_chunk_size=4096))
  common.seven_b_batch(c, row)
  common.size_for_topology(c, arg.topology)
  c.batch.batch_size *= arg.slices
  common.fsdp_ici(c)
  c.mesh.dcn.data = arg.slices  # multi-slice: data parallel across slices over DCN, FSDP inside each slice
  c.data.source = "pipeline"  # the sources come from --config.data.sources
  c.train.checkpoint_every = 1000
  c.train.log_every = 10
  return c
