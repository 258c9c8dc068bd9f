"""Images in and out: TIFF (:mod:`.tiff`), OME-Zarr and plain zarr (:mod:`.omezarr`). No torch, no Qt."""
