"""Ray job entrypoint for `fct data`: ray job submit --working-dir . -- python jobs/data.py --config FILE."""
import sys
from fct_dist.cli import main
sys.exit(main(["data", *sys.argv[1:]]))
