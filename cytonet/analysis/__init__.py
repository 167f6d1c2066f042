"""cytonet.analysis: what the learned features show (seeds 002, 004 and 000). Never imported by train/ or infer/.

- :mod:`~cytonet.analysis.features`: encoder features of patch-store splits and of dense section grids, stored
  as chunked zarr with their metadata.
- :mod:`~cytonet.analysis.cluster`: Ward clustering and the seed 002 Table 1 composition; agreement (ARI).
- :mod:`~cytonet.analysis.embed`: t-SNE and UMAP (optional umap-learn).
- :mod:`~cytonet.analysis.factors`: NMF, seed 000's coverage/leakage scores and greedy factor selection,
  Gaussian-mixture clustering.
- :mod:`~cytonet.analysis.figures`: PNG figures; :mod:`~cytonet.analysis.report`: the static HTML report.
- :mod:`~cytonet.analysis.steps`: the analysis of patch and section feature sets; :mod:`~cytonet.analysis.run`:
  `cytonet features` and `cytonet analyze` (:func:`~cytonet.analysis.run.compute_features`,
  :func:`~cytonet.analysis.run.run_analysis`).
"""
