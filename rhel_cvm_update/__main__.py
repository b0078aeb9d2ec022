import sys

from rhel_cvm_update.cli import main

sys.exit(main())
