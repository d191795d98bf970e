"""CRD's contrastive sampling: for each training sample, K dataset indices drawn from the other classes.

CRD (Tian et al. 2020) scores each sample's embedding against a memory bank at one positive position (the
sample itself) and K negative positions. The data loader supplies them as ``batch["contrast_index"]``
``(B, K + 1)``: column 0 is the sample's own index, columns 1..K are indices of samples of other classes
(never the anchor's class).

How the draw is vectorised. The training indices are sorted by class once, so that class ``c`` occupies
the block ``[start_c, end_c)`` of ``order``. The samples of the other classes are then the ``N - n_c``
positions outside that block, i.e. ``(end_c + r) mod N`` for ``r`` in ``[0, N - n_c)``: draw the K values
of ``r`` in one ``torch.randint`` call and read ``order`` there. That is a per-class table in O(N) memory
and no Python loop over K (dense per-class lists of the other classes' indices hold ``C x N`` integers:
40 MB for CIFAR-100, 10 GB for ImageNet).

Draws are **with replacement** by default: NCE treats the K noise samples as independent draws from the
noise distribution (uniform over the other classes here), and with replacement K may exceed the number
of available negatives. ``replacement=False`` gives K distinct negatives per sample (it costs a random
permutation of the ``N - n_c`` candidates per sample, as the reference benchmark's loader does when
K <= N - n_c, and needs K <= N - n_c).

Measured per-sample cost (CIFAR-100 sized labels: N = 50,000, 100 classes, K = 16,384; medians on a
shared 2-core CPU under load, so only the ratios mean much; ``tests/test_data.py::test_sampling_time_per_sample``
prints them):

- this sampler, one sample at a time (what the Dataset does): ~0.18 ms;
- this sampler, a batch of 64 at once: ~0.9 ms per sample (memory-bound here);
- reference-style loop, ``np.random.choice`` over a per-class list with replacement: ~0.14 ms;
- the same without replacement (the reference's choice whenever K <= N - n_c): ~0.55 ms.

So per sample it costs about what a NumPy draw with replacement costs and a third of the reference's
draw without replacement; what it saves is the per-class lists' memory and the global NumPy random state.

Randomness: each sample's negatives are drawn with a ``torch.Generator`` seeded from the sample's key
``(seed, epoch, index)`` (:func:`~lightning_kd.data.seeding.sample_key`, a stream of their own), so they are the
same in the main process and in any worker, whatever the number of workers, on any rank and after a resume,
differ from epoch to epoch, and do not depend on how many random numbers the augmentation consumed. Neither
torch's nor NumPy's global generator is used (seeding a generator costs about 3 microseconds a sample).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset

from lightning_kd.data.augment import as_sample
from lightning_kd.data.sampling import WrappedDataset
from lightning_kd.data.seeding import STREAM_NEGATIVES, SampleKey, sample_key, split_key


class NegativeSampler:
    """Draws K indices of samples from classes other than a given one (vectorised, no loop over K).

    Args:
        labels: ``(N,)`` class of every training sample (dataset order).
        num_negatives: ``K``, negatives per sample.
        replacement: draw with replacement (default; NCE's independent noise samples). Without replacement
            every sample's K negatives are distinct; K must then not exceed the smallest number of negatives
            of any class.

    Example:
        >>> labels = torch.tensor([0, 0, 1, 1, 2])
        >>> sampler = NegativeSampler(labels, num_negatives=6)
        >>> neg = sampler.sample(torch.tensor([0, 2]), torch.Generator().manual_seed(0))
        >>> neg.shape, bool((labels[neg[0]] != 0).all()), bool((labels[neg[1]] != 2).all())
        (torch.Size([2, 6]), True, True)
    """

    def __init__(self, labels: Tensor | Sequence[int], num_negatives: int, replacement: bool = True) -> None:
        labels = torch.as_tensor(labels, dtype=torch.long).reshape(-1)
        if num_negatives < 1:
            raise ValueError(f"num_negatives must be >= 1, got {num_negatives}")
        if labels.numel() == 0:
            raise ValueError("contrastive sampling needs a non-empty training set, found 0 labels")
        if labels.min() < 0:
            raise ValueError(f"class labels must be >= 0, found {int(labels.min())}")
        self.labels = labels
        self.num_negatives = int(num_negatives)
        self.replacement = replacement
        counts = torch.bincount(labels)
        present = counts[counts > 0]
        fewest_negatives = int(labels.numel() - present.max())
        if fewest_negatives == 0:
            raise ValueError(
                f"contrastive sampling draws negatives from other classes, but all {labels.numel()} training "
                f"samples have class {int(labels[0])}: the training set needs at least two classes"
            )
        if not replacement and num_negatives > fewest_negatives:
            raise ValueError(
                f"without replacement every sample needs {num_negatives} distinct negatives, but the largest "
                f"class leaves only {fewest_negatives}: lower contrast_negatives or sample with replacement"
            )
        #: dataset indices sorted by class; class c occupies order[start[c] : start[c] + count[c]]
        self.order = torch.argsort(labels, stable=True)
        self.count = counts
        self.start = torch.cumsum(counts, 0) - counts
        self.num_samples = labels.numel()

    def sample(self, labels: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """``(B, K)`` dataset indices of other-class samples for anchors of classes ``labels`` ``(B,)``.

        Also accepts a single label (a 0-d tensor or an int) and then returns ``(K,)``.
        """
        labels = torch.as_tensor(labels, dtype=torch.long)
        single = labels.dim() == 0
        labels = labels.reshape(-1)
        n, k = self.num_samples, self.num_negatives
        end = (self.start[labels] + self.count[labels]).tolist()  # first position after each anchor's block
        n_other = (n - self.count[labels]).tolist()  # >= 1
        # one vectorised draw of K per anchor (a loop over the B anchors, never over K: measured faster than
        # one (B, K) draw, which is memory-bound, and exact, where a (B, K) draw needs a modulo)
        if self.replacement:
            rows = [torch.randint(e, e + m, (k,), generator=generator) for e, m in zip(end, n_other)]
        else:
            rows = [torch.randperm(m, generator=generator)[:k].add_(e) for e, m in zip(end, n_other)]
        r = torch.stack(rows)
        # positions end .. end + n_other - 1, taken modulo N, run over every class block but the anchor's
        # (index_select: advanced indexing is many times slower on a 2-D index here)
        negatives = self.order.index_select(0, r.remainder_(n).reshape(-1)).view(r.shape)
        return negatives[0] if single else negatives


def labels_of(dataset: Dataset) -> Tensor:
    """The ``(N,)`` labels of a dataset of ``(image, label)`` pairs.

    Reads ``dataset.targets`` (torchvision's datasets) or ``dataset.labels`` when present; otherwise loads
    every item once (slow for large image datasets: give such a dataset a ``targets`` attribute).
    """
    for attribute in ("targets", "labels"):
        values = getattr(dataset, attribute, None)
        if values is not None:
            return torch.as_tensor(values, dtype=torch.long).reshape(-1)
    size = len(dataset)  # type: ignore[arg-type]
    return torch.as_tensor([int(dataset[i][1]) for i in range(size)], dtype=torch.long)


class ContrastiveDataset(WrappedDataset):
    """A dataset of ``(image, label)`` pairs (or dictionaries) as dictionaries with CRD's indices.

    Each item is ``{"image", "label", "index": i, "contrast_index": (K + 1,)}`` (plus the wrapped dataset's
    other keys) where ``contrast_index[0] == i`` (the positive) and the other K entries are indices of samples
    of other classes, drawn by a :class:`NegativeSampler` with a generator keyed by ``(seed, epoch, i)``.

    Args:
        dataset: the training set, yielding ``(image, label)`` or dictionaries with ``image`` and ``label``.
        num_negatives: ``K``.
        labels: the dataset's labels; read with :func:`labels_of` when not given.
        replacement: see :class:`NegativeSampler`.
        seed: the data seed used for a bare index (the training sampler passes ``(index, epoch, seed)`` keys;
            the epoch of a bare index is the last one given to :meth:`set_epoch`).
    """

    keyed = True

    def __init__(
        self,
        dataset: Dataset,
        num_negatives: int,
        labels: Tensor | None = None,
        replacement: bool = True,
        seed: int = 0,
    ) -> None:
        super().__init__(dataset)
        labels = labels_of(dataset) if labels is None else torch.as_tensor(labels, dtype=torch.long)
        size = len(dataset)  # type: ignore[arg-type]
        if labels.numel() != size:
            raise ValueError(f"got {labels.numel()} labels for a dataset of {size} samples")
        self.sampler = NegativeSampler(labels, num_negatives, replacement=replacement)
        self.seed, self.epoch = int(seed), 0
        self._generator: torch.Generator | None = None  # one per process, re-seeded for every sample

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        super().set_epoch(epoch)

    def negatives(self, index: int, epoch: int, seed: int) -> Tensor:
        """The ``(K,)`` negatives of sample ``index`` in ``epoch``: a pure function of the three and the labels."""
        if self._generator is None:
            self._generator = torch.Generator()
        self._generator.manual_seed(sample_key(seed, epoch, index, STREAM_NEGATIVES))
        return self.sampler.sample(self.sampler.labels[index], self._generator)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_generator"] = None  # each worker makes its own
        return state

    def __getitem__(self, key: SampleKey) -> dict[str, Any]:
        index, epoch, seed = split_key(key, self.epoch, self.seed)
        sample = as_sample(self.inner_item(key))
        sample["index"] = torch.as_tensor(index, dtype=torch.long)
        sample["contrast_index"] = torch.cat(
            [torch.tensor([index], dtype=torch.long), self.negatives(index, epoch, seed)]
        )
        return sample
