"""cytonet.train: see the modules of this package."""
