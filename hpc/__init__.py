"""hpc: launcher-side helpers (environment detection -> DistEnv, submitit, launch). Imports cytonet, never the reverse."""
