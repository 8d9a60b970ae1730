"""Ray job entrypoint for `fct refill`: ray job submit --working-dir . -- python jobs/refill.py --config FILE."""
import sys
from fct_dist.cli import main
sys.exit(main(["refill", *sys.argv[1:]]))
