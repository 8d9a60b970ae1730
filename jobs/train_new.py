"""Ray job entrypoint for `fct train-new`: ray job submit --working-dir . -- python jobs/train_new.py --config FILE."""
import sys
from fct_dist.cli import main
sys.exit(main(["train-new", *sys.argv[1:]]))
