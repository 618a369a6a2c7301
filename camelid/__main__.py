import logging
import os
import sys

from camelid.cli import main

code = main()
if int(os.environ.get("WORLD_SIZE", "1")) > 1:
    # A torchrun worker whose work is done, saved and closed leaves without interpreter finalization: gloo's threads
    # can abort a process there ("terminate called without an active exception", SIGABRT after a finished run,
    # seen in CI) and torchrun then reports the whole run as failed.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
sys.exit(code)
