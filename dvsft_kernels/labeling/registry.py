"""The registry of VLM families: the one place that lists them.

A VLM family (Qwen2-VL, LLaVA, ...) is one :class:`Family`, registered by its own module under
``dvsft_kernels/labeling/families/`` when that module is imported (``register(Family(...))``);
``dvsft_kernels.labeling`` imports the ``families`` package, which imports every family module, so
importing anything from ``dvsft_kernels.labeling`` fills the registry. ``VisualGrid.for_family`` /
``VisualGrid.from_processor``, :func:`detect_family`, :func:`grid_from_processor`,
:func:`image_token_id` and the CLI's ``--family`` all read it.

This module imports nothing from the rest of ``dvsft_kernels``: ``grid.py`` reads it, the family
modules (which build ``VisualGrid`` objects) write it, and neither imports the other's side.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any


def normalize_name(name: str) -> str:
    """The form names and aliases are stored in: lower case, ``-`` and ``.`` as ``_``
    (``"Qwen2.5-VL"`` -> ``"qwen2_5_vl"``)."""
    return name.strip().lower().replace("-", "_").replace(".", "_")


def processor_image_token_id(processor: Any) -> int | None:
    """The default :attr:`Family.image_token_id`: the processor's ``image_token_id`` attribute."""
    return getattr(processor, "image_token_id", None)


@dataclass(frozen=True, kw_only=True)
class Family:
    """One VLM family: the names it goes by, the processors it handles and its two grid builders.

    Attributes:
        name: canonical name (normalised, see :func:`normalize_name`); ``VisualGrid.family``.
        aliases: further names accepted wherever a family name is (the CLI's ``--family``,
            ``VisualGrid.for_family``): model names sharing the geometry (``qwen3_vl``, ``smolvlm``).
        processors: transformers processor class names handled (matched along the class hierarchy).
        image_processors: image processor class names handled on their own, without a processor
            (matched with a ``Pil`` / ``Fast`` suffix removed); only families whose image processor
            alone holds every setting the geometry needs (Qwen2-VL).
        build: the geometry builder, ``build(image_size, ...) -> VisualGrid``; its keyword defaults
            are the processor class defaults.
        from_processor: ``from_processor(processor, image_or_size, outputs=None, index=0, *,
            images_kwargs=None) -> VisualGrid``, reading settings from the processor object
            (``families.common.processor_adapter`` makes one from ``fn(settings, H, W, outputs,
            index)``).
        image_token_id: how the id of the placeholder token in ``input_ids`` is found on a processor
            (``None``: not found); default: ``processor.image_token_id``.
        default_processor: for families whose default geometry needs the processor run on the
            image (Qwen: ``image_grid_thw``): ``default_processor(name) -> processor`` with the
            class default settings for the name or alias given; ``None``: ``build(image_size)``
            alone is the default geometry (the CLI's ``--family`` without ``--processor``).
        description: a human-readable name for messages and docs.
    """

    name: str
    aliases: tuple[str, ...] = ()
    processors: tuple[str, ...] = ()
    image_processors: tuple[str, ...] = ()
    build: Callable[..., Any]
    from_processor: Callable[..., Any]
    image_token_id: Callable[[Any], int | None] = processor_image_token_id
    default_processor: Callable[[str], Any] | None = None
    description: str = ""

    def __post_init__(self):
        for attr in ("aliases", "processors", "image_processors"):
            v = getattr(self, attr)
            if isinstance(v, str) or not all(isinstance(x, str) and x for x in v):
                raise ValueError(f"Family.{attr} must be a sequence of non-empty strings, got {v!r}")
            object.__setattr__(self, attr, tuple(v))
        for n in (self.name, *self.aliases):
            if not isinstance(n, str) or not n or normalize_name(n) != n:
                raise ValueError(
                    f"Family names and aliases must be non-empty and normalised "
                    f"(lower case, '_' for '-' and '.'), got {n!r}"
                )
        for attr in ("build", "from_processor", "image_token_id"):
            if not callable(getattr(self, attr)):
                raise TypeError(f"Family.{attr} must be callable, got {getattr(self, attr)!r}")
        if self.default_processor is not None and not callable(self.default_processor):
            raise TypeError(
                f"Family.default_processor must be callable or None, got {self.default_processor!r}"
            )

    @property
    def names(self) -> tuple[str, ...]:
        """The name, then the aliases."""
        return (self.name, *self.aliases)


# canonical name -> Family (registration order); accepted name -> canonical name; class name -> canonical
_FAMILIES: dict[str, Family] = {}
_NAMES: dict[str, str] = {}
_PROCESSORS: dict[str, str] = {}
_IMAGE_PROCESSORS: dict[str, str] = {}


def register(family: Family) -> Family:
    """Add a family; returns it. A name, alias or processor class name already registered (by this
    family or another) raises ValueError: lookups must stay unambiguous."""
    if not isinstance(family, Family):
        raise TypeError(f"register() takes a Family, got {type(family).__name__}")
    seen: set[str] = set()
    for n in family.names:
        if n in _NAMES or n in seen:
            owner = _NAMES.get(n, family.name)
            raise ValueError(
                f"family {family.name!r}: name {n!r} is already registered (by family {owner!r})"
            )
        seen.add(n)
    for attr, table in (("processors", _PROCESSORS), ("image_processors", _IMAGE_PROCESSORS)):
        seen = set()
        for c in getattr(family, attr):
            if c in table or c in seen:
                owner = table.get(c, family.name)
                raise ValueError(
                    f"family {family.name!r}: {attr[:-1].replace('_', ' ')} class {c!r} is already "
                    f"registered (by family {owner!r})"
                )
            seen.add(c)
    _FAMILIES[family.name] = family
    _NAMES.update(dict.fromkeys(family.names, family.name))
    _PROCESSORS.update(dict.fromkeys(family.processors, family.name))
    _IMAGE_PROCESSORS.update(dict.fromkeys(family.image_processors, family.name))
    return family


def unregister(name: str) -> Family:
    """Remove a family (by its name or an alias) and return it."""
    family = get(name)
    del _FAMILIES[family.name]
    for table in (_NAMES, _PROCESSORS, _IMAGE_PROCESSORS):
        for k in [k for k, v in table.items() if v == family.name]:
            del table[k]
    return family


@contextlib.contextmanager
def registered(family: Family) -> Iterator[Family]:
    """Register ``family`` for the duration of a ``with`` block (tests, experiments)."""
    register(family)
    try:
        yield family
    finally:
        unregister(family.name)


def families() -> tuple[Family, ...]:
    """Every registered family, in registration order."""
    return tuple(_FAMILIES.values())


def names(*, aliases: bool = False) -> tuple[str, ...]:
    """Canonical family names in registration order; with ``aliases=True`` every accepted name
    (each family's name followed by its aliases)."""
    if aliases:
        return tuple(n for f in _FAMILIES.values() for n in f.names)
    return tuple(_FAMILIES)


def get(name: str, *, argument: str = "family") -> Family:
    """The family called ``name`` (its name or an alias, any case, ``-`` / ``.`` for ``_``).
    Unknown: ValueError ``"<argument>: unknown family ...; known: ..."``."""
    canonical = _NAMES.get(normalize_name(name)) if isinstance(name, str) else None
    if canonical is None:
        raise ValueError(f"{argument}: unknown family {name!r}; known: {', '.join(names(aliases=True))}")
    return _FAMILIES[canonical]


def for_processor(processor: Any) -> Family:
    """The family of a processor (or of an image processor registered on its own), by the class
    hierarchy; TypeError for a class no family handles."""
    for klass in type(processor).__mro__:
        if klass.__name__ in _PROCESSORS:
            return _FAMILIES[_PROCESSORS[klass.__name__]]
    for klass in type(processor).__mro__:
        name = klass.__name__
        for suffix in ("Pil", "Fast"):
            name = name.removesuffix(suffix)
        if name in _IMAGE_PROCESSORS:
            return _FAMILIES[_IMAGE_PROCESSORS[name]]
    raise TypeError(
        f"processor: unsupported class {type(processor).__name__}; supported processors: "
        f"{', '.join(sorted(_PROCESSORS))} (image processors alone: {', '.join(sorted(_IMAGE_PROCESSORS))}). "
        "Mllama and Florence-2 have no per-patch visual tokens in the decoder sequence."
    )


def detect_family(processor: Any) -> str:
    """Family name of a processor (or of an image processor registered on its own, e.g. Qwen2-VL's),
    by class hierarchy."""
    return for_processor(processor).name


def grid_from_processor(
    processor: Any, image_or_size: Any, outputs: Any = None, index: int = 0, *, images_kwargs: Any = None
) -> Any:
    """Build the grid of image ``index`` (flat over the batch) from a processor, the image (or its
    (H, W)) and the processor's outputs. Settings come from the processor object (not class
    defaults); values present in ``outputs`` are used and cross-checked (a mismatch raises).
    ``images_kwargs``: image kwargs you passed to the processor call, if any."""
    family = for_processor(processor)
    return family.from_processor(processor, image_or_size, outputs, index, images_kwargs=images_kwargs)


def image_token_id(processor: Any) -> int:
    """The id that marks visual-token positions in ``input_ids`` (``config.image_token_id``), as the
    processor's family finds it (Gemma 3: its tokenizer's soft token, since
    ``processor.image_token_id`` is the begin-of-image token)."""
    tid = for_processor(processor).image_token_id(processor)
    if tid is None:
        raise ValueError(f"cannot find the image token id of {type(processor).__name__}; pass image_token_id")
    return int(tid)
