"""Dense vision (detection, instance and semantic segmentation) on the vision encoder, and sequence labelling on the
language encoder: pyramids, heads through torchvision / transformers, data in the official formats, metrics."""
