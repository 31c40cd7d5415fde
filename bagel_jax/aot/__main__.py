"""`python -m bagel_jax.aot` = `bagel-aot`."""
from bagel_jax.aot.cli import main

main()
