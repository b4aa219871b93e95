"""EsViT self-supervised pretraining on the fused kernels of :mod:`esvit_kernels`.

* :mod:`esvit.models` -- Swin (window 7 / 14, on the fused window attention), DeiT-S / ViT-B and ResNet-50
  backbones (:func:`esvit.models.create_backbone`), DINO heads, the multi-crop wrapper.
* :mod:`esvit.losses` -- the combined view + region loss with its two centers.
* :mod:`esvit.data` -- multi-crop augmentation, image folders, the generated "embedded" dataset.
* :mod:`esvit.train` -- :class:`esvit.train.Trainer` (one training step) and :func:`esvit.train.pretrain`.
* :mod:`esvit.checkpoint` -- atomic, resumable checkpoints and :func:`esvit.checkpoint.load_backbone`.
* :mod:`esvit.cli` -- the ``esvit`` command (``esvit pretrain``, ``esvit make-dataset``).
"""

__version__ = "0.1.0"
