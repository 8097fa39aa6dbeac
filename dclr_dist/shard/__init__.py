"""Dataset packing: videos -> WebDataset tar shards (``python -m dclr_dist.shard``), and the
synthetic scene-bias corpus (``python -m dclr_dist.shard synth``)."""
