"""napari-coordgate: position-aware deblurring of microscope images with CoordGate U-Nets.

Importing the package must stay cheap: it imports neither torch nor Qt, so napari can read the plugin
manifest without them. Everything heavy lives in submodules.
"""

__version__ = "0.1.0"
