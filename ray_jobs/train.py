"""Ray job entrypoint: `ray job submit --working-dir . -- python -m ray_jobs.train --config configs/train.yaml ...`.

Only parses arguments and calls the library (same flags as `inverse-instruct train`).
"""

import sys

from pipeline.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
