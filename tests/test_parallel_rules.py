"""Where parameters live: the rules' divisibility fallback, its report, and the FSDP group the configs choose."""
import pytest
from jax.sharding import AbstractMesh, PartitionSpec as P

from bagel_jax.models import bagel as bagel_lib
from bagel_jax.models import config as model_config
from bagel_jax.parallel import mesh as mesh_lib
from bagel_jax.parallel import rules as rules_lib
from experiments.ablation import mot as ablation_mot
from experiments.bagel_7b import continued, pretrain


def _mesh(**sizes):
  return AbstractMesh(tuple(sizes.get(a, 1) for a in rules_lib.MESH_AXES), rules_lib.MESH_AXES)


def test_fit_keeps_the_longest_dividing_prefix_of_axes():
  mesh = _mesh(fsdp=4, tensor=2)
  assert rules_lib._fit(P(("fsdp", "tensor"), None), (16, 3), mesh) == P(("fsdp", "tensor"), None)
  assert rules_lib._fit(P(("fsdp", "tensor"), None), (12, 3), mesh) == P("fsdp", None)
  assert rules_lib._fit(P("tensor", "fsdp"), (3, 6), mesh) == P(None, None)


def _shortfalls(preset, ici):
  cfg = model_config.get_preset(preset, "mot")
  mesh = _mesh(**ici)
  rules = rules_lib.rules_for_mesh(rules_lib.get_rules("default"), mesh)
  return rules_lib.sharding_shortfalls(bagel_lib.param_logical_axes(cfg), bagel_lib.abstract_params(cfg), mesh,
                                       rules)


def _without_vae(rows):
  """Shortfalls less the frozen VAE's: it is FSDP-sharded on output channels, and its convs narrower than the
  FSDP group (3-, 32- or 128-channel outputs) stay whole, a few MiB per chip (all of it replicated: ~0.3 GiB)."""
  vae = [r for r in rows if r[0].startswith("['vae']")]
  assert sum(r[-1] for r in vae) < 16 * 2**20, vae
  return [r for r in rows if not r[0].startswith("['vae']")]


def test_fsdp_over_256_chips_leaves_the_vit_replicated_and_the_report_says_so():
  rows = _without_vae(_shortfalls("bagel_7b", dict(fsdp=256)))
  # SigLIP's 1,152-wide weights (and the connector's input side): ~0.4B fp32 parameters on every chip
  assert rows and all(path.startswith(("['vit']", "['connector']")) for path, *_ in rows)
  assert 1.4 * 2**30 < sum(r[-1] for r in rows) < 2.0 * 2**30
  assert rows[0][3] != rows[0][2]  # wanted vs got


@pytest.mark.parametrize("config_module,arg,data,fsdp", [
    (pretrain, "topology=v6e-256", 2, 128),  # gcd(256, 3584, 1152) = 128
    (pretrain, "topology=v5p-256", 1, 128),  # 128 chips
    (ablation_mot, "size=1.5b,topology=v6e-256", 2, 128),  # gcd(256, 1536, 1152) = 128
])
def test_pod_configs_pick_an_fsdp_group_with_no_shortfall(config_module, arg, data, fsdp):
  c = config_module.get_config(arg)
  assert (c.mesh.ici.data, c.mesh.ici.fsdp) == (data, fsdp)
  sizes = mesh_lib.resolve_axes(dict(c.mesh.ici), data * fsdp, "ici")
  assert _without_vae(_shortfalls(c.model.preset, sizes)) == []


def test_stage_config_tokens_per_row():
  c = pretrain.get_config("topology=v6e-256,tokens=32768,remat=offload_layer_inputs")
  assert c.batch.seq_len == 32_768 and c.batch.latent_capacity == 32_768 * 2 // 3
  assert c.model.remat_policy == "offload_layer_inputs"
  v5p, v6e = pretrain.get_config("topology=v5p-256"), pretrain.get_config("topology=v6e-256")
  assert v5p.batch.seq_len == 36_864  # the top of PT's 32-36K window
  # offload each layer's input to host only where the row does not fit HBM with 15% headroom (aot_7b.json):
  # v6e holds PT's 36,864 tokens in HBM, not CT's 46,080; v5e (16 GiB) holds neither
  assert (v5p.model.remat_policy, v6e.model.remat_policy) == ("nothing_saveable", "nothing_saveable")
  assert continued.get_config("topology=v6e-256").model.remat_policy == "offload_layer_inputs"
  assert continued.get_config("topology=v5p-256").model.remat_policy == "nothing_saveable"
  assert pretrain.get_config("topology=v6e-256,tokens=46080").model.remat_policy == "offload_layer_inputs"
  assert pretrain.get_config("topology=v5e-256").model.remat_policy == "offload_layer_inputs"
  with pytest.raises(ValueError, match="multiple of the attention kernel's 512-token tile"):
    pretrain.get_config("topology=v6e-256,tokens=33000")
