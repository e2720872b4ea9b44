"""Ray job entrypoint for the whole self-improvement loop (generate -> train -> evaluate base and tuned):
`ray job submit --working-dir . -- python -m ray_jobs.loop --config ...`.

Only parses arguments and calls the library (same flags as `inverse-instruct loop`).
"""

import sys

from pipeline.cli import main

if __name__ == "__main__":
    sys.exit(main(["loop", *sys.argv[1:]]))
