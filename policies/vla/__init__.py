"""OpenVLA-OFT in compact PyTorch: config, vision, Llama, heads, checkpoints, preprocessing, FLOPs."""
