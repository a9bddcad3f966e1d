"""What every monitor writer shares: the ``write_events`` interface and the optional-import check."""
import abc
import importlib
import importlib.util


class MonitorPackageMissing(ImportError):
    """A monitor is enabled but the library it writes through is not installed."""


def require(module: str, pip_name: str, section: str):
    """Import ``module`` or raise ``MonitorPackageMissing`` naming the pip package to install."""
    if importlib.util.find_spec(module) is None:
        raise MonitorPackageMissing(f"the '{section}' monitor is enabled but the '{module}' module is not installed; "
                                    f"install it with: pip install {pip_name} (or pip install deepscale[monitor]), "
                                    f"or set {section}.enabled to false")
    return importlib.import_module(module)


class Monitor(abc.ABC):
    """A destination for scalar events.

    Args:
        config: the monitor's config section (``enabled`` and its own keys).
    """

    #: (module, pip package) the writer needs; checked on every rank before rank 0 builds it.
    requires = None
    section = ""

    def __init__(self, config):
        self.config = config
        self.enabled = bool(config.enabled)

    @classmethod
    def check_installed(cls) -> None:
        if cls.requires is not None:
            require(cls.requires[0], cls.requires[1], cls.section)

    @abc.abstractmethod
    def write_events(self, event_list) -> None:
        """Write ``[(tag, value, step), ...]``."""

    def flush(self) -> None:
        """Push buffered events to their destination."""

    def close(self) -> None:
        """Flush and release files or runs."""
        self.flush()
