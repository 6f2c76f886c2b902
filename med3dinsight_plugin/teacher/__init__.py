"""The frozen 2D side of Med3DInsight, computed once: captions from a Hugging Face VLM (``captioner``), image and
text embeddings from an open_clip model (``clip``), stored in a memory-mapped cache (``cache``) by ``embed``.

open_clip and transformers are imported only when a teacher or captioner is built.
"""
