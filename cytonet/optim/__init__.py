"""cytonet.optim: see the modules of this package."""
