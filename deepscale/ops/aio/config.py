"""The ``aio`` section of a DeepSpeed config, validated."""
from dataclasses import dataclass, fields

ALIGNMENT = 4096


@dataclass(frozen=True)
class AioConfig:
    """Async I/O settings; field names are DeepSpeed's ``aio`` config keys.

    Args:
        block_size: bytes per I/O request; a positive multiple of 4096. Default 1 MiB.
        queue_depth: requests each worker keeps in flight. Default 8.
        thread_count: worker threads (DeepSpeed's ``intra_op_parallelism``). Default 1.
        single_submit: submit one request per system call instead of batches. Default False.
        overlap_events: overlap submission and completion. Default True.
        use_gds: GPUDirect Storage; not supported, must be False. Default False.
    """

    block_size: int = 1 << 20
    queue_depth: int = 8
    thread_count: int = 1
    single_submit: bool = False
    overlap_events: bool = True
    use_gds: bool = False

    def __post_init__(self):
        for key in ("block_size", "queue_depth", "thread_count"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"aio.{key} must be a positive integer, got {value!r}")
        if self.block_size % ALIGNMENT:
            raise ValueError(f"aio.block_size must be a multiple of {ALIGNMENT} (O_DIRECT alignment), got {self.block_size}")
        for key in ("single_submit", "overlap_events", "use_gds"):
            if not isinstance(getattr(self, key), bool):
                raise TypeError(f"aio.{key} must be true or false, got {getattr(self, key)!r}")
        if self.use_gds:
            raise ValueError("aio.use_gds=true is not supported; allowed: false")

    @classmethod
    def from_dict(cls, section):
        """Build from a config's ``aio`` dict; ``intra_op_parallelism`` is read as ``thread_count``."""
        section = dict(section or {})
        if "intra_op_parallelism" in section:
            section.setdefault("thread_count", section.pop("intra_op_parallelism"))
        allowed = {f.name for f in fields(cls)}
        unknown = sorted(set(section) - allowed)
        if unknown:
            raise ValueError(f"unknown aio config key(s) {unknown}; allowed: {sorted(allowed | {'intra_op_parallelism'})}")
        return cls(**section)
