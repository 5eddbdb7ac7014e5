"""Pictures and widgets for the notebook process: ipywidgets + matplotlib's object API.

Nothing here knows about processes or clusters; panels draw numbers they are handed (events,
estimates). matplotlib and ipywidgets are imported only when a widget or figure is built, so
that importing the package (which every rank does) stays cheap.
"""

from .calculator import MemoryCalculator
from .dashboard import PANELS, Dashboard

__all__ = ["PANELS", "Dashboard", "MemoryCalculator"]
