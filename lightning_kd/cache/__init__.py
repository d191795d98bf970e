"""The teacher-output cache: run the teacher once per view, not once per epoch, exactly.

Under CIFAR's crop + flip an image has 162 possible training views (81 crop corners x 2 flips; the digits' shift
25 at size 16). The library draws every view from ``(seed, epoch, index)`` and puts its parameters in the batch
(``index``, ``crop_top``, ``crop_left``, ``flip``), so the teacher's logits on every view can be computed once and
looked up by them: the same logits the live teacher computes, for every run and seed with that teacher.

    lightning-kd cache --config configs/digits/base.yaml --output outputs/digits/teacher-cache [--dtype fp32]
    lightning-kd fit --config configs/digits/base.yaml --config configs/methods/kd.yaml \\
        --model.teacher_cache=outputs/digits/teacher-cache

- :mod:`~lightning_kd.cache.views`: the view space of the training data and its bulk renderer;
- :mod:`~lightning_kd.cache.store`: the ``.npy`` memory map and its JSON manifest, every check before a read;
- :mod:`~lightning_kd.cache.build`: the build (chunked, resumable, several processes);
- :mod:`~lightning_kd.cache.serve`: the lookups inside :class:`~lightning_kd.core.Distillation`
  (``teacher_cache=PATH``), and what it refuses;
- :mod:`~lightning_kd.cache.command`: ``lightning-kd cache``.

Storage: ``N x views x C`` values, fp16 by default (2 bytes; relative error <= 2^-11 per logit, half an fp16
step) or fp32 (4 bytes, exact). CIFAR-100: 8.1 M views x 100 classes = 1.62 GB in fp16, 3.24 GB in fp32.
Only logits are cached: feature methods would need e.g. 265 GB for a 256x8x8 fp16 map per view.

fp16, measured on the digits teacher (resnet56 trained 15 epochs, 97.5% top-1; 26,975 views, logits up to
|z| = 69.4, median 3.3): max |fp16 - fp32| = 0.019 (at |z| = 69.4), mean 7.8e-4, max relative 4.879e-4 (the
bound 2^-11 = 4.883e-4; every value is the fp32 logit rounded to nearest); the soft targets at T = 4 move by at
most 5.2e-4 and KL(p_fp32 || p_fp16) <= 7.5e-7; 1 view in 26,975 changes its arg-max (a near tie). Use fp32 for
fits that must equal live-teacher fits; fp16 for the rest.
"""

from lightning_kd.cache.build import Progress, build_cache, partition
from lightning_kd.cache.serve import CacheServer, serve_teacher_cache
from lightning_kd.cache.store import TeacherCache, storage_bytes
from lightning_kd.cache.views import CacheUnsupportedError, TeacherCacheError, ViewSpace, view_space

__all__ = [
    "CacheServer",
    "CacheUnsupportedError",
    "Progress",
    "TeacherCache",
    "TeacherCacheError",
    "ViewSpace",
    "build_cache",
    "partition",
    "serve_teacher_cache",
    "storage_bytes",
    "view_space",
]
