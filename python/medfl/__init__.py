"""medfl for Python.

``medfl.client`` opens a mutually authenticated gRPC channel to a medfl coordinator
from an identity bundle (the ``profile.toml`` that ``medfl pki issue`` or
``medfl-agent enroll`` writes), and gives the Admin and Audit stubs generated from
``proto/medfl/v1/medfl.proto`` (``medfl.v1``).
"""

from medfl.client import Profile, admin, audit, channel, health_check, load_profile

__all__ = ["Profile", "admin", "audit", "channel", "health_check", "load_profile"]
