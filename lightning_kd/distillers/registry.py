"""Every method the library ships, in one table: ``list_distillers()`` and ``get_distiller(name)``.

The table is what the conformance tests, the overhead benchmark, ``make demo`` and the README's methods table
iterate over. Adding a method is one entry here (plus its class, its pure loss function, its config
``configs/methods/<name>.yaml`` and its own math tests).

Example:
    >>> from lightning_kd.distillers import get_distiller, list_distillers
    >>> list_distillers()[:3]
    ['kd', 'fitnet', 'at']
    >>> get_distiller("kd").build().temperature
    4.0
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from lightning_kd.distillers.base import Distiller
from lightning_kd.hparams import import_class, instantiate


@dataclass(frozen=True)
class MethodEntry:
    """One method.

    Attributes:
        name: the registry key, also the stem of its config ``configs/methods/<name>.yaml``.
        class_path: the distiller class.
        paper: authors, year and title.
        family: ``"logits"``, ``"features"``, ``"relational"`` or ``"contrastive"``.
        example_kwargs: constructor arguments for a self-contained example (tests, benchmarks): what the
            defaults need from a data module is replaced (e.g. CRD's in-batch negatives instead of memory banks).
        views: batch images the method reads besides ``image`` (MLKD's ``strong``).
    """

    name: str
    class_path: str
    paper: str
    family: str
    example_kwargs: dict[str, Any] = field(default_factory=dict)
    views: tuple[str, ...] = ()

    @property
    def cls(self) -> type[Distiller]:
        return import_class(self.class_path)

    @property
    def config(self) -> str:
        """The method's config, relative to the repository root (compose it after a pair or base config)."""
        return f"configs/methods/{self.name}.yaml"

    def build(self, **overrides: Any) -> Distiller:
        """A distiller with :attr:`example_kwargs` updated by ``overrides``."""
        return instantiate({"class_path": self.class_path, "init_args": {**self.example_kwargs, **overrides}}, Distiller)


_D = "lightning_kd.distillers."
METHODS: tuple[MethodEntry, ...] = (
    MethodEntry("kd", _D + "KD", "Hinton et al. 2015, Distilling the Knowledge in a Neural Network", "logits"),
    MethodEntry("fitnet", _D + "FitNet", "Romero et al. 2015, FitNets: Hints for Thin Deep Nets", "features"),
    MethodEntry("at", _D + "AT", "Zagoruyko & Komodakis 2017, Paying More Attention to Attention", "features"),
    MethodEntry("sp", _D + "SP", "Tung & Mori 2019, Similarity-Preserving Knowledge Distillation", "relational"),
    MethodEntry("cc", _D + "CC", "Peng et al. 2019, Correlation Congruence for Knowledge Distillation", "relational"),
    MethodEntry("vid", _D + "VID", "Ahn et al. 2019, Variational Information Distillation", "features"),
    MethodEntry("rkd", _D + "RKD", "Park et al. 2019, Relational Knowledge Distillation", "relational"),
    MethodEntry("pkt", _D + "PKT", "Passalis & Tefas 2018, Probabilistic Knowledge Transfer", "relational"),
    MethodEntry("ab", _D + "AB", "Heo et al. 2019, Activation Boundaries Formed by Hidden Neurons", "features",
                {"stage_epochs": 1}),
    MethodEntry("ft", _D + "FT", "Kim et al. 2018, Paraphrasing Complex Network: Factor Transfer", "features",
                {"stage_epochs": 1, "stage_lr": 0.01}),  # the reference rate for ResNet students
    MethodEntry("fsp", _D + "FSP", "Yim et al. 2017, A Gift from Knowledge Distillation (FSP)", "features",
                {"stage_epochs": 1}),
    MethodEntry("nst", _D + "NST", "Huang & Wang 2017, Neuron Selectivity Transfer", "features"),
    MethodEntry("crd", _D + "CRD", "Tian et al. 2020, Contrastive Representation Distillation", "contrastive",
                {"negatives": "batch"}),
    MethodEntry("dkd", _D + "DKD", "Zhao et al. 2022, Decoupled Knowledge Distillation", "logits"),
    MethodEntry("dist", _D + "DIST", "Huang et al. 2022, Knowledge Distillation from A Stronger Teacher", "logits"),
    MethodEntry("nkd", _D + "NKD", "Yang et al. 2023, From Knowledge Distillation to Self-Knowledge Distillation",
                "logits"),
    MethodEntry("ctkd", _D + "KD", "Li et al. 2023, Curriculum Temperature for Knowledge Distillation", "logits",
                {"temperature": {"class_path": _D + "CurriculumTemperature"}}),
    MethodEntry("mlkd", _D + "MLKD", "Jin et al. 2023, Multi-Level Logit Distillation", "logits", views=("strong",)),
    MethodEntry("reviewkd", _D + "ReviewKD", "Chen et al. 2021, Distilling Knowledge via Knowledge Review",
                "features"),
    MethodEntry("ofd", _D + "OFD", "Heo et al. 2019, A Comprehensive Overhaul of Feature Distillation", "features"),
)  # fmt: skip
_BY_NAME = {entry.name: entry for entry in METHODS}


def list_distillers(family: str | None = None) -> list[str]:
    """Registry names, in the order of the benchmark tables (``family`` filters)."""
    return [e.name for e in METHODS if family is None or e.family == family]


def get_distiller(name: str) -> MethodEntry:
    """The registry entry of ``name`` (case-insensitive)."""
    try:
        return _BY_NAME[name.lower()]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; known: {', '.join(list_distillers())}") from None
