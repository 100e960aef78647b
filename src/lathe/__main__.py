import sys

from lathe.cli import main
from lathe.distributed import leave_process_group

code = main()
leave_process_group()
sys.exit(code)
