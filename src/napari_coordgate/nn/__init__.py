"""Networks (pure torch, no napari)."""

from .coordgate import CoordGate, field_coordinates
from .unet import ImageTooSmallError, UNet, build_model, count_parameters

__all__ = ["CoordGate", "field_coordinates", "UNet", "build_model", "count_parameters", "ImageTooSmallError"]
