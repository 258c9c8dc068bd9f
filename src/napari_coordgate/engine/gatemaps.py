"""The learned CoordGate maps of a model, for display: how the network varies across the field.

No Qt, no napari: arrays in, arrays out.
"""

from __future__ import annotations

import numpy as np

__all__ = ["gate_maps"]


def gate_maps(saved, index: int = 0) -> np.ndarray:
    """Gate values of one down-path CoordGate over the whole training field.

    Parameters
    ----------
    saved
        A :class:`~napari_coordgate.model_io.SavedModel` whose network has ``gate="coordgate"``.
    index
        Which down-path gate (0 = the first, at full resolution).

    Returns
    -------
    ndarray, float32, shape (C, H / 2**index, W / 2**index)
        Channel ``c`` is the factor the gate multiplies feature channel ``c`` by at each field position.
    """
    import torch

    from ..nn.coordgate import field_coordinates

    gates = getattr(saved.model, "down_gates", None)
    if not gates:
        raise ValueError(
            f"this model has no CoordGate (gate={saved.config.gate!r}); train one with gate 'coordgate'"
        )
    if not 0 <= index < len(gates):
        raise ValueError(f"gate index {index} out of range; the model has {len(gates)} down-path gate(s)")
    gate = gates[index]
    device = next(gate.parameters()).device
    coords = field_coordinates(saved.field_shape, level=index, device=device)
    with torch.no_grad():
        g = gate.gate(coords)[0]
    return g.to("cpu", torch.float32).numpy()
