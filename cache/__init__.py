"""The HDF5 shard store: a cache is a folder of atomic shard files and one manifest.

`writer` appends rows and publishes finished shards, `reader` streams them back, `manifest` defines both.
"""
