"""The modules users build: ``PatchEmbeddings`` and the fused vit-pytorch Sequential
(``patch_embed``), and the whole ViT stem ``ViTStem`` (``vit_stem``)."""
