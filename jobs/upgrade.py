"""Ray job entrypoint for `fct upgrade`: ray job submit --working-dir . -- python jobs/upgrade.py --config FILE."""
import sys
from fct_dist.cli import main
sys.exit(main(["upgrade", *sys.argv[1:]]))
