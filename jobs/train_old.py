"""Ray job entrypoint for `fct train-old`: ray job submit --working-dir . -- python jobs/train_old.py --config FILE."""
import sys
from fct_dist.cli import main
sys.exit(main(["train-old", *sys.argv[1:]]))
