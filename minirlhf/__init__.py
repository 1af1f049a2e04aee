"""minirlhf: RLHF built from scratch, small enough to read and to run on a laptop CPU."""
from minirlhf import threads  # noqa: F401  (first: sets the OpenMP wait policy before torch loads)
