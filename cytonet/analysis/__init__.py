"""cytonet.analysis: see the modules of this package."""
