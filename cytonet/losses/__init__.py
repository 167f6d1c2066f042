"""cytonet.losses: see the modules of this package."""
