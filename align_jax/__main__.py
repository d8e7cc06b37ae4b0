import sys

from align_jax.cli import main

sys.exit(main())
