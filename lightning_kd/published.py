"""Published top-1 accuracies (%) the benchmark runs are compared with, as data, each with its source.

Two sources, as the project's method specifications transcribe them:

- ``METHODS.md``, "Accuracy targets": the CRD benchmark's CIFAR-100 table (Tian et al., ICLR 2020; the
  RepDistiller README): 13 teacher -> student pairs, the teacher and the student trained alone, 13 methods.
  METHODS.md calls these last-epoch accuracies; METHODS-MODERN.md section 10 lists the same KD and CRD numbers as
  best-epoch ones (as the official repositories report), so :data:`CRD_TABLE` says ``metric="unclear"`` and the
  report shows the difference to both the best and the last epoch.
- ``METHODS-MODERN.md`` section 10: the newer methods on five of those pairs (best epoch, mean of several runs
  where the source says so), and ImageNet ResNet-34 -> ResNet-18.

Keys are ``(benchmark, pair, method)``: ``pair`` is ``"<teacher>-<student>"`` with the networks' registered names
(:func:`lightning_kd.models.create_model`; torchvision's for ImageNet), ``method`` the method config's name in
``configs/methods/`` (``"kd"``, ``"kd_ls"``, ``"ctkd"``, ...), or ``"teacher"`` / ``"student"`` for the networks
trained alone. :func:`lookup` also accepts ``"+"`` for ``"_"`` (``"kd+ls"``) and any case.
"""

from __future__ import annotations

from dataclasses import dataclass

CRD_SOURCE = "METHODS.md accuracy targets (CRD benchmark, Tian et al. 2020; RepDistiller README)"
MODERN_SOURCE = "METHODS-MODERN.md section 10"


@dataclass(frozen=True)
class Published:
    """One published top-1 accuracy.

    Attributes:
        top1: top-1 accuracy in percent.
        source: where the number is transcribed from.
        label: the method as the source names it (``"KD+LS"``).
        metric: the epoch the source says it reports: ``"best"``, ``"last"`` or ``"unclear"``.
        note: what differs from the plain recipe (epochs, augmentation), when the source says so.
    """

    top1: float
    source: str
    label: str
    metric: str
    note: str = ""


# --- CIFAR-100, the CRD benchmark (METHODS.md) -------------------------------------------------------------------
CRD_COLUMNS = ("teacher", "student", "kd", "fitnet", "at", "sp", "cc", "vid", "rkd", "pkt", "ab", "ft", "fsp", "nst",
               "crd")  # fmt: skip
CRD_LABELS = ("teacher", "student", "KD", "FitNet", "AT", "SP", "CC", "VID", "RKD", "PKT", "AB", "FT", "FSP", "NST",
              "CRD")  # fmt: skip
# None: "n/a" in the source (FSP needs equal channel counts at every compared layer)
CRD_TABLE: dict[str, tuple[float | None, ...]] = {
    "wrn_40_2-wrn_16_2":    (75.61, 73.26, 74.92, 73.58, 74.08, 73.83, 73.56, 74.11, 73.35, 74.54, 72.50, 73.25, 72.91, 73.68, 75.48),
    "wrn_40_2-wrn_40_1":    (75.61, 71.98, 73.54, 72.24, 72.77, 72.43, 72.21, 73.30, 72.22, 73.45, 72.38, 71.59, None, 72.24, 74.14),
    "resnet56-resnet20":    (72.34, 69.06, 70.66, 69.21, 70.55, 69.67, 69.63, 70.38, 69.61, 70.34, 69.47, 69.84, 69.95, 69.60, 71.16),
    "resnet110-resnet20":   (74.31, 69.06, 70.67, 68.99, 70.22, 70.04, 69.48, 70.16, 69.25, 70.25, 69.53, 70.22, 70.11, 69.53, 71.46),
    "resnet110-resnet32":   (74.31, 71.14, 73.08, 71.06, 72.31, 72.69, 71.48, 72.61, 71.82, 72.61, 70.98, 72.37, 71.89, 71.96, 73.48),
    "resnet32x4-resnet8x4": (79.42, 72.50, 73.33, 73.50, 73.44, 72.94, 72.97, 73.09, 71.90, 73.64, 73.17, 72.86, 72.62, 73.30, 75.51),
    "vgg13-vgg8":           (74.64, 70.36, 72.98, 71.02, 71.43, 72.68, 70.71, 71.23, 71.48, 72.88, 70.94, 70.58, 70.23, 71.53, 73.94),
    "vgg13-MobileNetV2":    (74.64, 64.60, 67.37, 64.14, 59.40, 66.30, 64.86, 65.56, 64.52, 67.13, 66.06, 61.78, None, 58.16, 69.73),
    "ResNet50-MobileNetV2": (79.34, 64.60, 67.35, 63.16, 58.58, 68.08, 65.43, 67.57, 64.43, 66.52, 67.20, 60.99, None, 64.96, 69.11),
    "ResNet50-vgg8":        (79.34, 70.36, 73.81, 70.69, 71.84, 73.34, 70.25, 70.30, 71.50, 73.01, 70.65, 70.29, None, 71.28, 74.30),
    "resnet32x4-ShuffleV1": (79.42, 70.50, 74.07, 73.59, 71.73, 73.48, 71.14, 73.38, 72.28, 74.10, 73.55, 71.75, None, 74.12, 75.11),
    "resnet32x4-ShuffleV2": (79.42, 71.82, 74.45, 73.54, 72.73, 74.56, 71.29, 73.40, 73.21, 74.69, 74.31, 72.50, None, 74.68, 75.65),
    "wrn_40_2-ShuffleV1":   (75.61, 70.50, 74.83, 73.73, 73.32, 74.52, 71.38, 73.61, 72.21, 73.89, 73.34, 72.03, None, 74.89, 76.05),
}  # fmt: skip

# --- CIFAR-100, the newer methods (METHODS-MODERN.md section 10, best epoch) ---------------------------------------
MODERN_PAIRS = ("resnet32x4-resnet8x4", "wrn_40_2-wrn_16_2", "resnet56-resnet20", "vgg13-vgg8", "ResNet50-MobileNetV2")
# method key -> (label in the source, its source, note, one value per MODERN_PAIRS (None: "-" in the source));
# KD and CRD are in CRD_TABLE with the same numbers
MODERN_TABLE: dict[str, tuple[str, str, str, tuple[float | None, ...]]] = {
    "reviewkd": ("ReviewKD", "paper tables", "", (75.63, 76.12, 71.89, 74.84, 69.89)),
    "dkd": ("DKD", "mdistiller README", "", (76.32, 76.23, 71.97, 74.68, 70.35)),
    "ctkd": ("KD+CTKD", "CTKD / LS READMEs", "", (73.39, 75.45, 71.19, 73.52, 68.67)),
    "dist": ("DIST", "DIST README", "", (76.31, None, 71.75, None, 68.66)),
    "mlkd": ("MLKD", "LS README", "480 epochs, RandAugment", (77.08, 76.63, 72.19, 75.18, 71.04)),
    "kd_ls": ("KD+LS", "LS README", "", (76.62, 76.11, 71.43, 74.36, 69.02)),
    "dkd_ls": ("DKD+LS", "LS README", "", (77.01, 76.39, 72.32, 74.81, 70.45)),
    "ctkd_ls": ("CTKD+LS", "LS README", "", (76.67, 76.08, 71.34, 74.47, 69.36)),
    "mlkd_ls": ("MLKD+LS", "LS README", "480 epochs, RandAugment", (78.28, 76.95, 72.33, 75.22, 71.19)),
}

# --- ImageNet, ResNet-34 -> ResNet-18 (METHODS-MODERN.md section 10; teacher and student from METHODS.md) ----------
IMAGENET_PAIR = "resnet34-resnet18"
IMAGENET_TABLE: dict[str, tuple[str, float, str]] = {
    "teacher": ("teacher", 73.31, ""),
    "student": ("student", 69.76, ""),
    "kd": ("KD", 71.03, "mdistiller recipe: T 1, CE 0.5, KD 0.5 (METHODS.md: KD about 70.7 to 71.4)"),
    "crd": ("CRD", 71.17, ""),
    "reviewkd": ("ReviewKD", 71.61, ""),
    "dkd": ("DKD", 71.70, ""),
    "ctkd": ("KD+CTKD", 71.32, "120 epochs"),
    "dist": ("DIST", 72.07, ""),
    "nkd": ("NKD", 71.96, ""),
    "kd_ls": ("KD+LS", 71.42, ""),
}


# the order of the tables: the CRD benchmark's rows, then its columns and the newer methods
PAIR_ORDER = tuple(CRD_TABLE)
METHOD_ORDER = ("teacher", "student", "kd", "fitnet", "at", "sp", "cc", "vid", "rkd", "pkt", "ab", "ft", "fsp", "nst",
                "crd", "crd_kd", "reviewkd", "ofd", "dkd", "dist", "ctkd", "nkd", "mlkd", "kd_ls", "dkd_ls", "ctkd_ls",
                "mlkd_ls")  # fmt: skip


def method_key(method: str) -> str:
    """The form methods are compared in: lower case, ``"+"`` written ``"_"`` (``"KD+LS"`` -> ``"kd_ls"``)."""
    return method.strip().lower().replace("+", "_")


def published_table() -> dict[tuple[str, str, str], Published]:
    """Every published number, keyed by ``(benchmark, pair, method key)``."""
    table: dict[tuple[str, str, str], Published] = {}
    for pair, values in CRD_TABLE.items():
        for method, label, value in zip(CRD_COLUMNS, CRD_LABELS, values, strict=True):
            if value is not None:
                table["cifar100", pair, method] = Published(value, CRD_SOURCE, label, "unclear")
    for method, (label, where, note, values) in MODERN_TABLE.items():
        for pair, value in zip(MODERN_PAIRS, values, strict=True):
            if value is not None:
                table["cifar100", pair, method] = Published(value, f"{MODERN_SOURCE} ({where})", label, "best", note)
    for method, (label, value, note) in IMAGENET_TABLE.items():
        table["imagenet", IMAGENET_PAIR, method] = Published(value, MODERN_SOURCE, label, "unclear", note)
    return table


_TABLE = published_table()


def lookup(benchmark: str, pair: str, method: str) -> Published | None:
    """The published number for a run's labels, or ``None`` when the sources have none."""
    return _TABLE.get((benchmark.lower(), pair, method_key(method)))
