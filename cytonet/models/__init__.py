"""cytonet.models: see the modules of this package."""
