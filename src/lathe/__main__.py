import sys

from lathe.cli import main
from lathe.distributed import exit_process, launched

code = main()
if launched():  # one process of a torchrun / accelerate group
    exit_process(code)
sys.exit(code)
