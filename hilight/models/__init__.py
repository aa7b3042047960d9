"""Model families: CLIP-ViP (``clipvip``); strict checkpoint I/O (``checkpoints``); tokenizers (``tokenizers``)."""
