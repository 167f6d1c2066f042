"""cytonet.infer: see the modules of this package."""
