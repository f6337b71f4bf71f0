"""Per-dtype tolerances: the single table lives in `fasttrack.testing` (also used by
`python -m fasttrack.check`)."""
from fasttrack.testing import TOL, assert_close, tolerance  # noqa: F401
