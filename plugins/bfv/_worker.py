"""Entry point of a worker process (``workers.WorkerPool``); not imported by the plugin."""

import sys

from secureinfer.plugins.bfv.workers import main

if __name__ == "__main__":
    main(sys.argv[1:])
