"""Pure tensor math of the PTQ algorithms beyond round-to-nearest (imports only ``numerics`` and ``errors``)."""
