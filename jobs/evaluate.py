"""Ray job entrypoint for `fct evaluate`: ray job submit --working-dir . -- python jobs/evaluate.py --config FILE."""
import sys
from fct_dist.cli import main
sys.exit(main(["evaluate", *sys.argv[1:]]))
