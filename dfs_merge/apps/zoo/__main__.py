"""`python -m dfs_merge.apps.zoo`: train, check and tabulate the zoo (see `family.main_zoo`)."""

import sys

from dfs_merge.apps.zoo.family import main_zoo

sys.exit(main_zoo())
