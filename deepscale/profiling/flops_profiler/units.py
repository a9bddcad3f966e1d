"""Human-readable numbers for the profile report, with DeepSpeed's function names and output
shape (``"1.23 G"``, ``"4.5 MMACs"``, ``"7.1 ms"``) so code that parses them keeps working."""

DEFAULT_PRECISION = 2

# Prefix -> magnitude, largest first; "" covers 1..999 and exactly 0.
_PREFIXES = (("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3), ("", 1.0), ("m", 1e-3), ("u", 1e-6))
_MAGNITUDE = dict(_PREFIXES)


def number_to_string(num, units=None, precision=DEFAULT_PRECISION) -> str:
    """``num`` scaled to a metric prefix: ``number_to_string(1.5e9) == "1.5 G"``.

    Args:
        num: the value.
        units: force a prefix (``"T"``, ``"G"``, ``"M"``, ``"K"``, ``"m"``, ``"u"``); None picks
            the largest prefix not above ``num``. An unknown prefix means no scaling.
        precision: decimals kept. Default 2.
    """
    if units is None:
        units = "u"
        if num == 0:
            units = ""
        else:
            for prefix, magnitude in _PREFIXES:
                if abs(num) >= magnitude:
                    units = prefix
                    break
    magnitude = _MAGNITUDE.get(units, 1.0)
    return f"{round(num / magnitude, precision):g} {units}"


def macs_to_string(macs, units=None, precision=DEFAULT_PRECISION) -> str:
    """``"12.3 GMACs"``."""
    return f"{number_to_string(macs, units, precision)}MACs"


def flops_to_string(flops, units=None, precision=DEFAULT_PRECISION) -> str:
    """``"12.3 TFLOPS"`` (a rate: operations per second)."""
    return f"{number_to_string(flops, units, precision)}FLOPS"


def bytes_to_string(num_bytes, units=None, precision=DEFAULT_PRECISION) -> str:
    """``"1.5 GB"``."""
    return f"{number_to_string(num_bytes, units, precision)}B"


def params_to_string(params_num, units=None, precision=DEFAULT_PRECISION) -> str:
    """Parameter counts use B for billions: ``"1.3 B"``, ``"125 M"``."""
    if units:
        units = units.replace("B", "G")
    return number_to_string(params_num, units, precision).replace("G", "B").strip()


def duration_to_string(duration, units=None, precision=DEFAULT_PRECISION) -> str:
    """Seconds: ``"12.5 ms"``."""
    return f"{number_to_string(duration, units, precision)}s"
