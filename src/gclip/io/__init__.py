"""Images in (decoding, folders and lists of inputs, instance masks); label maps, overlays, RLE, manifests out
(every file written under a temporary name, then renamed)."""
