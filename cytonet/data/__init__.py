"""cytonet.data: synthetic brains, section stores, patch stores, sampling and augmentation."""
