"""Inference: preprocessing, sliding windows (plan, pad, batch, merge), the forward pass, the Segmenter, and the
post-processing from logits to labels. The reference loop (:mod:`.reference`) is the plain yardstick."""
