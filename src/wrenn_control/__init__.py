"""Control plane: the Wrenn REST API, auth, database, lifecycle and reaper.

    from wrenn_control import Settings, create_app
    app = create_app(Settings(data_dir=...), host_agent)   # FastAPI app; routes under /api
"""

from wrenn_control.app import create_app
from wrenn_control.config import Settings

__all__ = ["Settings", "create_app"]
