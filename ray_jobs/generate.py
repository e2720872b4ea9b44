"""Ray job entrypoint: `ray job submit --working-dir . -- python -m ray_jobs.generate --config ... --output s3://...`.

Only parses arguments and calls the library (same flags as `inverse-instruct generate`).
"""

import sys

from pipeline.cli import main

if __name__ == "__main__":
    sys.exit(main(["generate", *sys.argv[1:]]))
