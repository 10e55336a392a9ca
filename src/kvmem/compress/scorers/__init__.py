"""One module per eviction method; ``kvmem.compress.registry`` lists them."""
