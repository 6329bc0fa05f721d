"""Token-reduction plug-ins for the VLA model core: LightVLA, LightVLA*, FastV, SparseVLM, VLA-Cache."""
