"""`make test`'s pytest (`python -m tests.run`): `python -m pytest`, ended by pytest's verdict.

The suite's process ends holding Ray's and gRPC's clients, torch's, PyArrow's and PyAV's
native threads, DeepSpeed and a moto server's leftovers at once. Once in CI it segfaulted
after pytest had printed "387 passed", with no stack from pytest's faulthandler, so after
the tests: most likely while the interpreter tore those libraries down (not reproduced in
two full runs and eight scripted ones). No product process is that mixture (the CLIs the
integration tests start are processes of their own, whose exit codes the tests check). So
the exit code is pytest's, and the process leaves without that teardown. A crash during
the tests still fails the run: the faulthandler prints its stack and the process dies with
it (`make test` runs this with -X faulthandler, which also covers pytest's own shutdown).
"""

import os
import sys

import pytest

if __name__ == "__main__":
    code = int(pytest.main(sys.argv[1:]))
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
