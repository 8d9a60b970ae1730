"""Ray job entrypoint for `fct gc`: ray job submit --working-dir . -- python jobs/gc.py --lake URI."""
import sys
from fct_dist.cli import main
sys.exit(main(["gc", *sys.argv[1:]]))
