"""Loaded by every Python process of the e2e federation (via PYTHONPATH) when
CONSORTIA_TEST_OPEN_LOG is set: records every data file a process opens, with its pid,
so the test can prove a site never opens another site's partition."""

import os
import sys

_log = os.environ.get("CONSORTIA_TEST_OPEN_LOG")
if _log:

    def _hook(event, args):
        if event == "open" and args and str(args[0]).endswith((".csv", ".parquet")):
            with open(_log, "a") as fh:  # noqa: PTH123 - the hook must not recurse on .csv
                fh.write(f"{os.getpid()} {' '.join(sys.argv)} :: {args[0]}\n")

    sys.addaudithook(_hook)
