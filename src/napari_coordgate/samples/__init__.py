"""Images and models to try things on: specimens (:mod:`.specimens`), napari sample data (:mod:`.sample_data`),
the bundled sample model (:mod:`.sample_model`) and synthetic bead slides (:mod:`.beads`)."""
