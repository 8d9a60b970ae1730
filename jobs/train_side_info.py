"""Ray job entrypoint for `fct train-side-info`: ray job submit --working-dir . -- python jobs/train_side_info.py --config FILE."""
import sys
from fct_dist.cli import main
sys.exit(main(["train-side-info", *sys.argv[1:]]))
