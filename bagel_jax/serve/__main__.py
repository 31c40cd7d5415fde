"""python -m bagel_jax.serve --checkpoint DIR: the same as `bagel-serve`."""
import sys

from bagel_jax.serve.app import main

sys.exit(main())
