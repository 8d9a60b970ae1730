"""Ray job entrypoint for `fct bench`: ray job submit --working-dir . -- python jobs/bench.py --config FILE."""
import sys
from fct_dist.cli import main
sys.exit(main(["bench", *sys.argv[1:]]))
