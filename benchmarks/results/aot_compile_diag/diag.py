"""Scratch: where do the 7B PT compile seconds go? args: name topology fsdp batch seq_scale layers vit_layers hidden attn"""
import json, sys, time, os, resource
kv = dict(a.split("=", 1) for a in sys.argv[1:])
from bagel_jax.aot import libtpu, training
from bagel_jax.parallel import topology as topology_lib
from experiments.bagel_7b import pretrain
topo = kv.get("topology", "v5p:2x2x1")
c = pretrain.get_config("variant=mot,topology=v5p-256")
c.unlock() if hasattr(c, "unlock") else None
n = topology_lib.chip_count(topo)
c.mesh.ici.fsdp = n
c.batch.batch_size = int(kv.get("batch", n))
scale = float(kv.get("seq_scale", 1))
for k in ("seq_len", "ce_capacity", "image_capacity", "latent_capacity", "und_capacity", "vit_capacity"):
  c.batch[k] = int(c.batch[k] * scale) if k != "image_capacity" else max(1, int(c.batch[k] * scale))
for k, v in kv.items():
  if k.startswith("b."): c.batch[k[2:]] = int(v)
ov = {}
if "layers" in kv: ov["num_layers"] = int(kv["layers"])
if "hidden" in kv:
  h = int(kv["hidden"]); ov.update(hidden_size=h, intermediate_size=4 * h, num_heads=max(1, h // 128), num_kv_heads=max(1, h // 512))
c.model.llm_overrides = ov
if "vit_layers" in kv: c.model.vit_layers = int(kv["vit_layers"])
if "attn" in kv: c.model.attention_impl = kv["attn"]
if "ce_chunk" in kv: c.model.ce_chunk_size = int(kv["ce_chunk"])
if "remat" in kv: c.model.remat_policy = kv["remat"]
if kv.get("opts") == "none":
  libtpu.compiler_options = lambda topo: {}
elif kv.get("opts"):
  drop = kv["opts"].split("+")
  orig = libtpu.compiler_options
  libtpu.compiler_options = lambda topo: {k: v for k, v in orig(topo).items() if not any(d in k for d in drop)}
if kv.get("extra"):  # extra compiler options, k1:v1+k2:v2 (libtpu settings under test)
  extra = dict(o.split(":", 1) for o in kv["extra"].split("+"))
  base_opts = libtpu.compiler_options
  libtpu.compiler_options = lambda topo: dict(base_opts(topo), **extra)
with libtpu.libtpu_lock():
  devices = libtpu.topology_devices(topo, 1)
  t = time.time()
  compiled, s, timing = training.compile_step(c, devices, topo, None)
ma = compiled.memory_analysis()
out = dict(kv, timing=timing, temp_gib=ma.temp_size_in_bytes / 2**30, arg_gib=ma.argument_size_in_bytes / 2**30)
print(json.dumps(out), flush=True)
with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "results.jsonl"), "a") as f:
  f.write(json.dumps(out) + "\n")
