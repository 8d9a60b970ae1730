"""Ray job entrypoint for `fct backfill`: ray job submit --working-dir . -- python jobs/backfill.py --config FILE."""
import sys
from fct_dist.cli import main
sys.exit(main(["backfill", *sys.argv[1:]]))
