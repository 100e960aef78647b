"""`lathe train` over several configs, one after another, in every process of one torchrun group
(tests/e2e/test_distributed.py): the imports and the process group are paid once, not per stage.

    python -m torch.distributed.run --nproc_per_node 2 -m tests.dist_driver a.yaml b.yaml ...
"""

from __future__ import annotations

import sys

from lathe.cli import main
from lathe.distributed import exit_process

if __name__ == "__main__":
    exit_process(max(main(["train", path]) for path in sys.argv[1:]))
