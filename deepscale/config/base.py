"""Base classes for config sections."""
from pydantic import BaseModel, ConfigDict


class ConfigSection(BaseModel):
    """Base of every typed config section.

    Unknown keys are forbidden (``errors.find_unknown_keys`` reports them with
    a suggestion before pydantic runs). Fields with a DeepSpeed alias (for
    example ``stage3_prefetch_bucket_size``) accept both the alias and the
    field name.
    """

    model_config = ConfigDict(
        extra="forbid",
        populate_by_name=True,
        # DeepSpeed has keys such as ``model_info`` and
        # ``model_persistence_threshold``; allow the ``model_`` prefix.
        protected_namespaces=(),
    )


class FreeFormSection(ConfigSection):
    """A section whose extra keys are passed through untouched.

    Used where DeepSpeed forwards the remaining keys to another library
    (for example ``amp`` goes to ``apex.amp.initialize``). Declared fields are
    still type checked; the extra keys are available as ``extra_params``.
    """

    model_config = ConfigDict(extra="allow", populate_by_name=True, protected_namespaces=())

    @property
    def extra_params(self) -> dict:
        """The keys of this section that are not declared fields."""
        return dict(self.model_extra or {})
