"""The KServe adapter: serves an exported model package (`efcm.training.export`) over v1 and v2 (Open
Inference Protocol) REST and gRPC.

This package is the only part of `efcm` that imports kserve. `model.EFCMModel` is the
`kserve.Model`; `server.serve` is what `efcm serve` runs; `request` parses request bodies and
`policy` decides which slide URIs the server may open and the limits of a request.

Importing this package (or `policy`, which `efcm.deploy.render` uses to check slide URI
prefixes, or `request`) imports neither kserve nor torch: the package re-exports nothing,
and only `model` and `server` import kserve, through `efcm.serving._kserve` (which hides
`sys.argv` from kserve's import-time argument parsing).
"""
