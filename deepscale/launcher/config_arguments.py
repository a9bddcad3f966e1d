"""``add_config_arguments``: the training script's ``--deepscale``/``--deepscale_config`` flags.

Both spellings are accepted, ``--deepscale*`` and DeepSpeed's ``--deepspeed*``, and both
attribute names are filled, so code written for either (``args.deepspeed_config`` or
``args.deepscale_config``) keeps working after switching the import.
"""
import argparse

_ENABLE_DESTS = ("deepscale", "deepspeed")
_CONFIG_DESTS = ("deepscale_config", "deepspeed_config")


class _SetBoth(argparse.Action):
    """Stores the value under every name of the pair; a conflicting second value is an error."""

    def __init__(self, option_strings, dest, pair, **kwargs):
        self.pair = pair
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        value = True if self.nargs == 0 else values
        for name in self.pair:
            previous = getattr(namespace, name, None)
            if name != self.dest and previous not in (None, False) and previous != value:
                parser.error(f"{option_string} {value!r} conflicts with the value given for --{name}: {previous!r}")
        for name in self.pair:
            setattr(namespace, name, value)


def add_config_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the deepscale flags to a training script's parser.

    Adds ``--deepscale``/``--deepspeed`` (enable; both set ``args.deepscale`` and
    ``args.deepspeed``) and ``--deepscale_config``/``--deepspeed_config`` (path of the JSON
    config; both set ``args.deepscale_config`` and ``args.deepspeed_config``, default None).

    Args:
        parser: an ``argparse.ArgumentParser``.

    Returns:
        the same parser, for chaining.
    """
    if not isinstance(parser, argparse.ArgumentParser):
        raise TypeError(f"add_config_arguments expects an argparse.ArgumentParser, got {type(parser).__name__}")
    group = parser.add_argument_group("deepscale", "deepscale configuration")
    for dest in _ENABLE_DESTS:
        group.add_argument(f"--{dest}", dest=dest, action=_SetBoth, pair=_ENABLE_DESTS, nargs=0, default=False,
                           help="enable deepscale (both spellings set args.deepscale and args.deepspeed)")
    for dest in _CONFIG_DESTS:
        group.add_argument(f"--{dest}", dest=dest, action=_SetBoth, pair=_CONFIG_DESTS, default=None, type=str,
                           metavar="PATH",
                           help="deepscale JSON config (both spellings set args.deepscale_config and "
                                "args.deepspeed_config)")
    return parser
