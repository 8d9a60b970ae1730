"""Ray job entrypoint for `fct import-model`: ray job submit --working-dir . -- python jobs/import_model.py --config FILE."""
import sys
from fct_dist.cli import main
sys.exit(main(["import-model", *sys.argv[1:]]))
