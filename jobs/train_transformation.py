"""Ray job entrypoint for `fct train-transformation`: ray job submit --working-dir . -- python jobs/train_transformation.py --config FILE."""
import sys
from fct_dist.cli import main
sys.exit(main(["train-transformation", *sys.argv[1:]]))
