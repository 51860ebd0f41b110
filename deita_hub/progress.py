"""deita-hub's own progress bars (select, embed, score): shown unless the caller asks for none or the user gave -q.

-q also sets `TQDM_DISABLE` for other libraries' bars, but tqdm lets an explicit `disable=False` win over that
variable, so deita-hub's bars read `QUIET_ENV`, which the CLI sets on every run (and child processes inherit).
"""

from __future__ import annotations

import os

QUIET_ENV = "DEITA_HUB_QUIET"


def quiet() -> bool:
    """Whether this run prints results and errors only (`deita-hub -q`)."""
    return os.environ.get(QUIET_ENV) == "1"


def progress_bar(*, show: bool = True, **kwargs):
    """A tqdm bar (`kwargs` as tqdm's), hidden when `show` is false or the run is quiet."""
    from tqdm.auto import tqdm

    return tqdm(disable=not show or quiet(), **kwargs)
