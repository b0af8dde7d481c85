"""Conversion of other libraries' models, in place, by class swaps: one module per library
(``timm``, ``transformers``, ``vit_pytorch``, ``open_clip``, ``segment_anything``,
``diffusers``), the fused patch convolutions they share (``convs``), the framework of whole-stem
conversion (``_base``) and the walks with their summary (``convert``)."""
