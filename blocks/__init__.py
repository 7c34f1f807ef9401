"""Prefect Block types that hold imageopt's configuration on the Prefect server.

``prefect block register -m blocks`` registers the three of them; a saved one
is then chosen by name, and :func:`imageopt.settings.get_settings` takes its
values in place of the environment's:

======================  ============================  ============================
block type              named by                      holds
======================  ============================  ============================
``imageopt-provider``   ``IMAGEOPT_PROVIDER_BLOCK``   URL, model or version, token
``imageopt-database``   ``IMAGEOPT_DATABASE_BLOCK``   the PostgreSQL DSN
``imageopt-optimizer``  ``IMAGEOPT_OPTIMIZER_BLOCK``  limits, defaults, storage
======================  ============================  ============================

The token and the DSN are secret fields: the API and the UI show them as
``********``, and they never appear in a repr or a log line. Anyone who can
call the Prefect API can still read them in full (``include_secrets=true``),
so the API must be reachable only by those trusted with the secrets.
"""

from blocks.database import DatabaseBlock
from blocks.optimizer import OptimizerBlock
from blocks.provider import ProviderBlock

__all__ = ["DatabaseBlock", "OptimizerBlock", "ProviderBlock"]
