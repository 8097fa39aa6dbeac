"""``python tune/search.py``: the sweep command kept at its old path; the code is ``dclr_dist.sweep``
(also ``python -m dclr_dist.sweep`` or ``dclr-tune``). Needs the package installed (``pip install -e .``)."""

import sys

from dclr_dist.sweep import main

if __name__ == "__main__":
    sys.exit(main())
