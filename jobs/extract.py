"""Ray job entrypoint for `fct extract`: ray job submit --working-dir . -- python jobs/extract.py --config FILE."""
import sys
from fct_dist.cli import main
sys.exit(main(["extract", *sys.argv[1:]]))
