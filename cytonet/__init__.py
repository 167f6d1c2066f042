"""cytonet: contrastive cytoarchitectonic mapping of whole histological brain sections.

Entry point for users is the ``cytonet`` command (``cytonet.cli``). Subpackages:
``data`` (synthetic brains, section and patch stores), ``models``, ``losses``, ``optim``,
``train``, ``infer`` and ``analysis``; ``cytonet.config`` holds the typed configuration.
"""

__version__ = "0.1.0"
