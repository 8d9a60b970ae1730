"""Ray job entrypoint for `fct index`: ray job submit --working-dir . -- python jobs/index.py --config FILE."""
import sys
from fct_dist.cli import main
sys.exit(main(["index", *sys.argv[1:]]))
