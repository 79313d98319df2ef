"""`python -m dcedit_kernels.cli` (as torchrun's `-m dcedit_kernels.cli train ...` runs it)."""

from . import main

raise SystemExit(main())
