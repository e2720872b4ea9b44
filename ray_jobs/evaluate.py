"""Ray job entrypoint: `ray job submit --working-dir . -- python -m ray_jobs.evaluate --config ...`.

Only parses arguments and calls the library (same flags as `inverse-instruct evaluate`).
"""

import sys

from pipeline.cli import main

if __name__ == "__main__":
    sys.exit(main(["evaluate", *sys.argv[1:]]))
