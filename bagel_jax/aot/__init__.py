"""The AOT tool (`bagel-aot`): the real training step compiled for a TPU topology on a CPU host (libtpu and
`get_topology_desc`, abstract state; no TPU, no weights), and what the compiled program says about memory and
speed. A tool (layer 6): it may import train/, data/, models/, kernels/; nothing in the package below the CLIs
imports it.

  libtpu     the machine-wide libtpu lock, topology devices, the compiler flags this libtpu accepts
  rows       representative packed rows of a stage's data mix (model FLOPs, attention tile fraction)
  costs      memory / cost analysis / HLO collectives of a compiled executable, roofline arithmetic
  training   the train step: compile, memory, per-step cost by 1/2-layer unrolled variants, roofline, sweeps
  inference  a denoising step and a text decode step
  report     the JSON schema, the console and markdown tables, merging reports
  cli        the `bagel-aot` command (ml_collections config_flags)

What XLA reports and what it does not (measured, jax 0.10.2 / libtpu 0.0.42): `memory_analysis()` is the
per-chip budget the pod will use. `cost_analysis()` counts a `scan`/`while` body once and Pallas kernels
through their `cost_estimate`, and its `optimal_seconds` is not usable for a scanned program. So the report
carries: (1) analytic model FLOPs (bagel_jax/train/flops.py) of a representative packed row of the stage's mix;
(2) compiled FLOPs and bytes per step (`training`); (3) a roofline step time per segment (non-layer part, one
LLM layer x depth, one ViT layer x depth) with collectives summed from the compiled HLO and timed at the
per-chip ICI bandwidth; (4) an MFU estimate from them, labelled an estimate, with its assumptions. Not a
measurement. See docs/tpu_aot.md.
"""
