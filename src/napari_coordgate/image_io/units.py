"""Physical units in image metadata: the one table of spellings, their NGFF names and the length factors.

TIFF metadata (ImageJ ``unit``, OME ``PhysicalSizeXUnit``) spells a unit many ways (``µm``, ``um``, ``micron``,
ImageJ's escaped ``\\u00B5m``, ...). OME-Zarr (NGFF) names it by its UDUNITS-2 name (``micrometer``). The TIFF
reader's pixel size and the OME-Zarr axes both read units here, so a unit one knows the other knows too.
"""

from __future__ import annotations

__all__ = ["NGFF_UNITS", "ngff_unit", "um_per_unit"]

#: unit spellings found in metadata (lower case) -> NGFF (UDUNITS-2) names
_SPELLINGS = {
    "µm": "micrometer", "\u03bcm": "micrometer", "um": "micrometer", "micron": "micrometer", "microns": "micrometer",
    "micrometre": "micrometer", "\\u00b5m": "micrometer", "nm": "nanometer", "nanometre": "nanometer",
    "mm": "millimeter", "millimetre": "millimeter", "cm": "centimeter", "centimetre": "centimeter", "m": "meter",
    "metre": "meter", "å": "angstrom", "in": "inch", "s": "second", "sec": "second", "ms": "millisecond",
    "min": "minute", "h": "hour",
}
#: the units NGFF allows on an axis
NGFF_UNITS = frozenset({
    "angstrom", "attometer", "centimeter", "decimeter", "exameter", "femtometer", "foot", "gigameter", "hectometer",
    "inch", "kilometer", "megameter", "meter", "micrometer", "mile", "millimeter", "nanometer", "parsec", "petameter",
    "picometer", "terameter", "yard", "yoctometer", "yottameter", "zeptometer", "zettameter",
    "attosecond", "centisecond", "day", "decisecond", "exasecond", "femtosecond", "gigasecond", "hectosecond",
    "hour", "kilosecond", "megasecond", "microsecond", "millisecond", "minute", "nanosecond", "petasecond",
    "picosecond", "second", "terasecond", "yoctosecond", "yottasecond", "zeptosecond", "zettasecond",
})
#: µm per unit, for the length units a microscope's pixel size is given in
_UM_PER = {"nanometer": 1e-3, "micrometer": 1.0, "millimeter": 1e3}


def ngff_unit(unit) -> str | None:
    """The NGFF name of a unit as metadata spells it (``"µm"``, ``"micron"``, ``"micrometer"``, ...), or None
    when it is empty or not a unit NGFF knows."""
    if not unit:
        return None
    u = str(unit).strip()
    u = _SPELLINGS.get(u.lower(), _SPELLINGS.get(u, u))
    return u if u in NGFF_UNITS else None


def um_per_unit(unit) -> float | None:
    """Micrometres per ``unit`` (any spelling :func:`ngff_unit` reads) for nm, µm and mm, else None."""
    return _UM_PER.get(ngff_unit(unit) or "")
