"""The KServe adapter: serves an exported model package (`efcm.training.export`) over v1 and v2
(Open Inference Protocol) REST and gRPC.

This package is the only part of `efcm` that imports kserve. `model.EFCMModel` is the
`kserve.Model` (load, preprocess, predict, postprocess); `executor` bounds the model work of every
request; `errors` is the one table from errors to HTTP and gRPC status; `server` is what
`efcm serve` runs (its options, kserve's app with efcm's handlers); `request` parses request
bodies; `policy` decides which slide URIs the server may open; `_kserve` holds every private
kserve API efcm relies on, checked against one kserve version.

Importing this package (or `policy`, or `request`, or `executor`)
imports neither kserve nor torch: the package re-exports nothing, and only `model`, `server` and
`errors` import kserve, through `efcm.serving._kserve` (which hides `sys.argv` from kserve's
import-time argument parsing).
"""
